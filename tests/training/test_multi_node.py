"""Two machines for real: two network namespaces joined by a veth pair, each with its own address, run the two
commands of docs/distributed.md (torchrun, c10d rendezvous, gloo over the veth). Checks what a user moving to two
machines relies on: the global batch the run prints, the adapter of a one-process run, one writer, a lost machine
stopping the other with a message that says how to resume, and a resumed run ending where an uninterrupted one ends.

Needs root (or CAP_NET_ADMIN) for `ip netns`; skipped with the reason elsewhere. Only the addresses of the two
namespaces made here are used, and both namespaces are removed whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_jsonl

pytestmark = pytest.mark.slow

DOC = REPO / "docs" / "distributed.md"
HOSTS = ("10.77.0.1", "10.77.0.2")
DOC_HOSTS = ("10.0.0.1", "10.0.0.2")  # the addresses the documented commands use
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
              "LOCAL_ADDR", "TORCHELASTIC_RUN_ID")
# The same settings as the one-process reference: 96 uneven rows, 12 optimizer steps of 8 samples an epoch.
SETTINGS = {"train": {"epochs": 3, "batch_size": 4, "global_batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 0,
                      "logging_steps": 1},
            "lora": {"dropout": 0.0}, "model": {"dtype": "float32", "device": "cpu"}}
STOP_WITHIN_S = 60  # a lost peer must stop the other machine within this (measured: about 4 s)


def documented_commands() -> list[list[str]]:
    """The two commands of the docs' two-machines block, as argument lists (first machine first)."""
    text = DOC.read_text(encoding="utf-8")
    block = text.split("<!-- two-machines", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class Hosts:
    """Two namespaces, h0 at 10.77.0.1 and h1 at 10.77.0.2, joined by a veth pair (names unique to this process)."""

    def __init__(self):
        tag = f"{os.getpid() % 1_000_000}"
        self.ns = [f"lmt{tag}h0", f"lmt{tag}h1"]
        self.ifname = [f"lv{tag}a", f"lv{tag}b"]

    def up(self) -> None:
        ns, dev = self.ns, self.ifname
        _ip("netns", "add", ns[0])
        _ip("netns", "add", ns[1])
        _ip("link", "add", dev[0], "type", "veth", "peer", "name", dev[1])
        for i in (0, 1):
            _ip("link", "set", dev[i], "netns", ns[i])
            _ip("-n", ns[i], "addr", "add", f"{HOSTS[i]}/24", "dev", dev[i])
            _ip("-n", ns[i], "link", "set", dev[i], "up")
            _ip("-n", ns[i], "link", "set", "lo", "up")  # a host reaches its own address through its loopback

    def kill(self, i: int) -> None:
        """Stop host i the hard way: SIGKILL to every process in its namespace (all of them started by this test)."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns[i]], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass

    def down(self) -> None:
        for i in (0, 1):
            self.kill(i)
            subprocess.run(["ip", "netns", "del", self.ns[i]], capture_output=True)  # takes its end of the veth along


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@pytest.fixture
def hosts():
    if shutil.which("ip") is None:
        pytest.skip("two hosts need the `ip` command (iproute2)")
    made = Hosts()
    try:
        made.up()
    except RuntimeError as e:
        made.down()
        pytest.skip(f"two hosts need network namespaces, not permitted here: {e}")
    try:
        yield made
    finally:
        made.down()


def launch(hosts: Hosts, config: Path, output: str, cwd: list[Path], extra: list[str]) -> list[subprocess.Popen]:
    """Start the documented command on both hosts, with this test's config, output folder and host addresses."""
    procs = []
    for i, command in enumerate(documented_commands()):
        env_assignments = [t for t in command[: command.index("torchrun")] if "=" in t]
        args = command[command.index("torchrun") + 1 :]
        args = [a.replace(DOC_HOSTS[0], HOSTS[0]).replace(DOC_HOSTS[1], HOSTS[1]) for a in args]
        args = [str(config) if a == "my.yaml" else output if a == "/shared/runs/my-run" else a for a in args]
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for assignment in env_assignments:
            name, value = assignment.split("=", 1)
            env[name] = hosts.ifname[i] if value == "eth0" else value
        command = ["ip", "netns", "exec", hosts.ns[i], sys.executable, "-m", "torch.distributed.run", *args, *extra]
        procs.append(subprocess.Popen(command, cwd=cwd[i], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        results.append((p.returncode, out))
    return results


def adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5, name


def test_two_hosts_train_what_one_process_trains_and_resume_after_losing_one(hosts, tiny_bloom_dir, tmp_path):
    from lmtune.config import build_config
    from lmtune.training.train import train

    rows = [json.loads(line) for line in (REPO / "data" / "vi_ai_qa.jsonl").read_text(encoding="utf-8").splitlines()[:96]]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({**SETTINGS, "model": {**SETTINGS["model"], "name_or_path": tiny_bloom_dir},
                                      "data": {"paths": [data]}}), encoding="utf-8")
    one = tmp_path / "one"
    flat = {f"{section}.{key}": value for section, values in SETTINGS.items() for key, value in values.items()}
    train(build_config(overrides={"model.name_or_path": tiny_bloom_dir, "data.paths": [data],
                                  "train.output_dir": str(one), **flat}), log=lambda _: None)

    # 1. Each host with its own disk (its own working folder, a relative output): rank 0 writes, the other nothing.
    own = [tmp_path / "host0", tmp_path / "host1"]
    for folder in own:
        folder.mkdir()
    (code0, out0), (code1, out1) = finish(launch(hosts, config, "runs/my-run", own, []))
    assert code0 == 0 and code1 == 0, (out0 + out1)[-4000:]
    assert out0.count("training: 36 optimizer steps of 8 samples (4 per device x 1 accumulation x 2 processes)") == 1
    assert "training:" not in out1 and "saved adapter" not in out1
    assert list(own[1].iterdir()) == []  # the second host wrote nothing at all
    assert [p.name for p in (own[0] / "runs").iterdir()] == ["my-run"]
    assert_same_weights(adapter(one), adapter(own[0] / "runs" / "my-run"))

    # 2. Shared storage, a checkpoint after every step; the second host is killed once step 8 or a later one is
    # saved. Only the newest checkpoints are kept, so on a fast machine checkpoint-8 itself may be gone between two
    # looks: any complete checkpoint from step 8 on will do, and 28 more steps leave time to see one.
    shared = tmp_path / "shared"
    shared.mkdir()
    output = str(shared / "my-run")
    every_step = ["--train.checkpoint_minutes", "0.0001"]
    procs = launch(hosts, config, output, own, every_step)
    checkpoints = shared / "my-run.partial" / "checkpoints"

    def saved_from_step_8() -> bool:
        found = checkpoints.glob("checkpoint-*/lmtune_checkpoint.json") if checkpoints.is_dir() else []
        return any(int(m.group(1)) >= 8 for p in found if (m := re.fullmatch(r"checkpoint-(\d+)", p.parent.name)))

    deadline = time.monotonic() + 240
    while not saved_from_step_8():
        assert procs[0].poll() is None and time.monotonic() < deadline, "no checkpoint from step 8 on"
        time.sleep(0.05)
    killed_at = time.monotonic()
    hosts.kill(1)
    out0, _ = procs[0].communicate(timeout=STOP_WITHIN_S)
    stopped_after = time.monotonic() - killed_at
    procs[1].communicate(timeout=30)
    assert procs[0].returncode != 0 and stopped_after < STOP_WITHIN_S, out0[-3000:]
    lost = re.search(r"error: training interrupted \(lost the connection to the process at 10\.77\.0\.2:\d+: .*\); "
                     r"checkpoint of step (\d+) of 36 saved in (\S+)\nresume with:\n  (.+ --resume)\n", out0)
    assert lost, out0[-3000:]
    assert int(lost.group(1)) >= 8 and lost.group(2).startswith(str(shared / "my-run.partial" / "checkpoints"))
    assert "Traceback" not in out0.split("error: training interrupted")[0][-2000:]  # a message, not a traceback first

    # 3. The same two commands with --resume: the run ends with the weights of the uninterrupted ones.
    (code0, out0), (code1, out1) = finish(launch(hosts, config, output, own, [*every_step, "--resume"]))
    assert code0 == 0 and code1 == 0, (out0 + out1)[-4000:]
    assert f"resume: continuing from {lost.group(2)}" in out0
    assert_same_weights(adapter(one), adapter(shared / "my-run"))
    assert sorted(p.name for p in shared.iterdir()) == ["my-run"]  # checkpoints gone with the finished run

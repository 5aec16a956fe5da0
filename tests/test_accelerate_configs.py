"""The shipped `accelerate launch` configs: each parses with the installed accelerate, names only options it knows,
with values it accepts, and the FSDP one wraps the right blocks of BLOOM and Llama."""

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, constants
from conftest import REPO

CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
EXPECTED = {"single_gpu.yaml": DistributedType.NO, "multi_gpu_ddp.yaml": DistributedType.MULTI_GPU,
            "fsdp.yaml": DistributedType.FSDP, "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
            "deepspeed_zero3.yaml": DistributedType.DEEPSPEED, "multi_node.yaml": DistributedType.MULTI_GPU}
# Values accelerate turns into torch enums: its own lists of the names it accepts.
FSDP_CHOICES = {"fsdp_sharding_strategy": constants.FSDP_SHARDING_STRATEGY,
                "fsdp_auto_wrap_policy": constants.FSDP_AUTO_WRAP_POLICY,
                "fsdp_backward_prefetch": constants.FSDP_BACKWARD_PREFETCH,
                "fsdp_state_dict_type": constants.FSDP_STATE_DICT_TYPE}


def test_every_expected_config_ships():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


def _launch_args(path: Path):
    """What `accelerate launch --config_file PATH -m lmtune train` resolves, through accelerate's own validation."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "-m", "lmtune", "train"])
    return parser, *_validate_launch_command(args)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_with_installed_accelerate(path):
    config = load_config_from_file(str(path))  # refuses unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[path.name]
    assert config.mixed_precision == "no"  # lmtune chooses bf16/fp16 itself; the launcher must not override it

    parser, args, defaults, _ = _launch_args(path)
    known = {action.dest: action for action in parser._actions}
    for key, value in config.fsdp_config.items():
        name = key if key.startswith("fsdp_") else f"fsdp_{key}"  # accelerate's own prefixing rule
        assert name in known, f"{path.name}: fsdp_config.{key} is not an option accelerate knows"
        if known[name].choices:
            assert str(value) in known[name].choices, f"{path.name}: {key}={value!r}"
        if name in FSDP_CHOICES:
            assert value in FSDP_CHOICES[name], f"{path.name}: {key}={value!r} not in {FSDP_CHOICES[name]}"
    for key in config.deepspeed_config:
        assert key in known, f"{path.name}: deepspeed_config.{key} is not an option accelerate knows"
    assert args.num_processes == config.num_processes >= 1
    assert args.use_fsdp == (config.distributed_type == DistributedType.FSDP)
    assert args.use_deepspeed == (config.distributed_type == DistributedType.DEEPSPEED)


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_build_accelerates_deepspeed_plugin(name, stage):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    _, args, defaults, _ = _launch_args(REPO / "configs" / "accelerate" / name)
    args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)  # as `accelerate launch` sets it
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    # batch and accumulation come from lmtune's config through the Trainer, never from the launcher file
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    if stage == 3:  # without it the saved adapter would hold empty shards
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_multi_node_config_names_its_rendezvous():
    config = load_config_from_file(str(REPO / "configs" / "accelerate" / "multi_node.yaml"))
    assert config.num_machines > 1 and config.main_process_ip and config.main_process_port
    assert config.num_processes % config.num_machines == 0


@pytest.mark.parametrize("fixture,block", [("tiny_bloom_dir", "BloomBlock"), ("tiny_llama_dir", "LlamaDecoderLayer")])
def test_fsdp_config_wraps_each_models_own_blocks(fixture, block, request):
    """TRANSFORMER_BASED_WRAP without a class list: peft's policy (which the Trainer installs for LoRA under FSDP)
    wraps every transformer block of the model and each trainable LoRA layer in its own unit."""
    import torch
    from peft.utils.other import fsdp_auto_wrap_policy

    from lmtune.model import add_lora, load_model, resolve_source

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / "fsdp.yaml"))
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config  # a fixed list fails on the other model
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the adapter is saved as one file

    model = add_lora(load_model(resolve_source(request.getfixturevalue(fixture))), 4, 8, 0.0, "none", "auto")
    with mock.patch.dict(os.environ, {}, clear=False):
        os.environ.pop("FSDP_TRANSFORMER_CLS_TO_WRAP", None)
        policy = fsdp_auto_wrap_policy(model)
    wrapped = {type(m).__name__ for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)}
    assert block in wrapped
    lora_leaves = [m for n, m in model.named_modules() if "lora_A" in n and isinstance(m, torch.nn.Linear)]
    assert lora_leaves and all(policy(module=m, recurse=False, nonwrapped_numel=0) for m in lora_leaves)

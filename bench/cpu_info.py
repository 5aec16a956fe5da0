"""The CPU a benchmark ran on, for its printed lines: the model name and the extensions that decide lmtune's default
precision and how fast its kernels and llama.cpp's run (AVX2, AVX-512, AVX-512 VNNI for int8 matmuls, AVX-512 BF16,
AMX).

    from cpu_info import describe   # after sys.path.insert(0, <bench folder>)
    describe()  # 'Intel(R) Xeon(R) Processor [avx2 avx512f avx512_vnni avx512_bf16 amx]', or
                #  '... [avx2; no avx512f avx512_vnni avx512_bf16 amx]'
"""

from __future__ import annotations

import platform

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx")


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    entries: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                entries[key.strip()] = value.strip()
    except OSError:
        pass
    return entries


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def cpu_flags() -> list[str] | None:
    """Those of FLAGS the CPU lists ('amx' for amx_tile), or None where the flags cannot be read."""
    listed = _cpuinfo().get("flags")
    if listed is None:
        return None
    present = set(listed.split())
    return [flag for flag in FLAGS if (flag if flag != "amx" else "amx_tile") in present]


def describe() -> str:
    flags = cpu_flags()
    if flags is None:
        return f"{cpu_model()} [flags unknown]"
    missing = [flag for flag in FLAGS if flag not in flags]
    return f"{cpu_model()} [{' '.join(flags)}{'; no ' + ' '.join(missing) if missing else ''}]"

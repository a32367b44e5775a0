"""What every benchmark table states about the machine it ran on (CPU model and bf16 flags,
threads, torch version, load, priority), so a number is never read without its conditions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def machine_info(threads: int | None = None) -> dict[str, Any]:
    import torch

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": info.get("model name") or platform.processor() or "unknown",
        "cpu_family_model": f"family {info.get('cpu family', '?')} model {info.get('model', '?')}",
        "cores": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512f": "avx512f" in flags,
        "torch": torch.__version__,
        "torch_cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in load] if load else None,
        "nice": os.nice(0),
    }


def describe(m: dict[str, Any]) -> str:
    """One line for a table caption."""
    bf16 = "AMX-BF16" if m.get("amx_bf16") else ("AVX512-BF16, no AMX" if m.get("avx512_bf16")
                                                  else "no native bf16")  # fmt: skip
    load = m.get("load_avg_at_start")
    return (f"{m['cpu']} ({m['cpu_family_model']}, {bf16}), {m['threads']} thread(s) of "
            f"{m['cores']} cores, torch {m['torch']}, GPU: {m['gpu'] or 'none'}, load average at "
            f"start {load[0] if load else '?'}, nice {m['nice']}")  # fmt: skip

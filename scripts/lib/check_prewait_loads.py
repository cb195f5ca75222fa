#!/usr/bin/env python3
"""Checks, in the SASS of compiled kernels, that the loads our kernels issue before waiting for the
kernel before them (programmatic dependent launch: common.cuh's wait_for_inputs) are still there.

Why: ptxas schedules griddepcontrol.wait (SASS `ACQBULK`) above loads of read-only memory in the
same basic block, whatever the PTX order. int4.cu's 4-bit GEMV was built so for weeks: its first
weight tiles loaded after the wait, and an H100's 4-bit one-row decode step was 2.7% slower for
it (docs/PERFORMANCE.md, issue 9, run 52). common.cuh's wait_for_inputs_after_loads keeps them
in front; this check fails the build if a kernel loses them again.

How: check_prewait_loads.py CUOBJDUMP CUBIN...  (scripts/check-kernels.sh runs it on the sm_90a
bundle). Each rule names kernels by a pattern and the SASS instruction that must come before the
first ACQBULK at least N times; every rule must match at least one kernel.
"""

import re
import subprocess
import sys

# (kernel name pattern, instruction pattern, at least, what the source loads before the wait)
RULES = [
    (r"gemv_w4_(gated_)?(pairs_)?(bf16|f16)$", r"\bLDG\.E\.NA\.128\b", 4, "its first 4 weight tiles"),
    (r"gemm_w4_n\d+_(bf16|f16)$", r"\bLDG\.E\.NA\.128\b", 4, "each warp's first weight tiles"),
    (r"gather_inputs_(bf16|f16)$", r"\bLDG\.E\.CONSTANT\b", 1, "its element of the permutation"),
    (r"lora_shrink_(bf16|f16)$", r"\bLDG\.E\.128\b", 1, "its rows of A"),
    (r"lora_expand_(bf16|f16)$", r"\bLDG\.E\.128\b", 2, "its columns of B"),
    (r"gemv_(fp8_)?m\d+_r\d+(_u\d+)?_(bf16|f16)$", r"\bCCTL\b", 1, "the L2 prefetch of its first chunks"),
    (r"gemv_(fp8_)?mma\w*_(bf16|f16)$", r"\bCCTL\b", 1, "the L2 prefetch of its first tiles"),
    (r"paged_attention_decode_hd\d+\w*_(bf16|f16)$", r"\bLDGSTS\b", 1, "earlier steps' keys and values"),
    (r"rms_norm(_residual)?(_fp8_rows)?_(bf16|f16)$", r"\bLDG\.E\.128\b", 1, "its piece of the weight"),
    (r"all_reduce_residual_norm_(bf16|f16)$", r"\bLDG\.E\.128\b", 1, "its piece of the weight"),
    (r"attention_combine_(bf16|f16)$", r"\bPREEXIT\b", 1, "the next kernel's launch"),
]


def functions(cuobjdump: str, cubin: str):
    out = subprocess.run(
        [cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True
    ).stdout
    for chunk in re.split(r"\n\s*Function : ", out)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        code = [line for line in chunk.split("\n") if re.match(r"\s*/\*[0-9a-f]{4}\*/", line)]
        yield name, code


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    cuobjdump, cubins = sys.argv[1], sys.argv[2:]
    matched = [0] * len(RULES)
    failures = 0
    for cubin in cubins:
        for name, code in functions(cuobjdump, cubin):
            wait = next((j for j, line in enumerate(code) if "ACQBULK" in line), None)
            for i, (kernel, instruction, least, what) in enumerate(RULES):
                if not re.search(kernel, name):
                    continue
                matched[i] += 1
                if wait is None:
                    print(f"FAIL  {name}: no griddepcontrol.wait (ACQBULK) in its SASS")
                    failures += 1
                    continue
                found = sum(1 for line in code[:wait] if re.search(instruction, line))
                if found < least:
                    shown = instruction.replace("\\b", "").replace("\\", "")
                    print(
                        f"FAIL  {name}: {found} x {shown} before the wait, at least {least} ({what})"
                    )
                    failures += 1
    for (kernel, _, _, _), count in zip(RULES, matched):
        if count == 0:
            print(f"FAIL  no kernel matches {kernel}")
            failures += 1
        else:
            print(f"ok    {count:3d} kernels {kernel}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

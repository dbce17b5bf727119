"""The code-generation gate (benchmarks/codegen_report.py): every Triton kernel compiled for
sm_90 and sm_80 with the engine's own launch configurations, read back from ptxas and SASS,
and the rules that fail it; plus the rules and the SASS reading on small known inputs."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "codegen_report.py")
# CI's twin environment checks sm_90 only (DCVIT_CODEGEN_ARCHS=90) to keep its time small
ARCHS = os.environ.get("DCVIT_CODEGEN_ARCHS", "90,80").split(",")
_spec = importlib.util.spec_from_file_location("codegen_report", SCRIPT)
codegen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(codegen)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One CI-profile run in its own process (a fake GPU driver and no interpreter there)."""
    out = tmp_path_factory.mktemp("codegen")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    archs = [a for arch in ARCHS for a in ("--arch", arch)]
    done = subprocess.run([sys.executable, SCRIPT, "--profile", "ci", "--out", str(out), *archs], env=env,
                          capture_output=True, text=True, timeout=1800)
    print(done.stdout)  # the table, in the log of a failing run
    rows = []
    if os.path.exists(out / "codegen.csv"):
        with open(out / "codegen.csv") as f:
            rows = list(csv.DictReader(f))
    return done, rows


def test_every_kernel_compiles_without_spills_and_uses_tensor_cores(report):
    done, rows = report
    assert rows, done.stdout[-3000:] + done.stderr[-3000:]
    failures = [line for line in done.stdout.splitlines() if line.startswith("GATE FAILED")]
    assert done.returncode == 0 and not failures, "\n".join(failures) or done.stderr[-3000:]


def test_every_triton_kernel_is_in_the_report_for_both_archs(report):
    # derived from the kernel modules, so a new kernel that no workload launches is noticed
    from dcvit_engine.kernels import attention, fused_linear, head_norm_rope, token_merge

    defined = {name for module in (attention, fused_linear, head_norm_rope, token_merge)
               for name in vars(module)
               if name.startswith("_") and name.endswith("_kernel")}
    _, rows = report
    for arch in ARCHS:
        reported = {r["kernel"] for r in rows if r["arch"] == arch and r["workloads"] != "csrc/cuda"}
        assert defined <= reported, f"sm_{arch}: no workload launches {sorted(defined - reported)}"


def test_cuda_kernels_of_the_extension(report):
    done, rows = report
    cuda = [r for r in rows if r["workloads"] == "csrc/cuda"]
    if not cuda:
        note = next((line for line in done.stdout.splitlines() if "CUDA part skipped" in line), "")
        pytest.skip(note.split("; ")[-3] if note else "the extension was built without CUDA kernels")
    assert "90" in {r["arch"] for r in cuda}  # the twin builds sm_90 only
    assert all(r["regs"] not in ("", "0") for r in cuda)


def _row(**overrides):
    row = dict(arch=90, kernel="_linear_residual_kernel", dtype="bf16", config="M128 N128", variant="",
               workloads="deit_b/mlp", compiles=True, error="", regs=150, spill_bytes=0, smem_bytes=96 * 1024,
               tc_instructions=4, loop_tc=4, loop_hgmma=4, loop_instructions=100, loop_widest_load_bits=128,
               loop_narrowest_load_bits=128, loop_cp_async=True, loop_tma=False)
    row.update(overrides)
    return row


def test_rules_fail_spills_compile_errors_and_gemms_without_tensor_cores():
    rows = codegen.evaluate([
        _row(),
        _row(spill_bytes=8),
        _row(dtype="fp32", spill_bytes=64, loop_tc=0),  # fp32 is not held to either rule
        _row(loop_tc=0, loop_hgmma=0),
        _row(kernel="_weighted_gather_kernel", loop_tc=0, loop_hgmma=0),  # a copy kernel: no tensor cores
        _row(compiles=False, error="error: unknown"),
        _row(smem_bytes=300 * 1024),
        _row(arch=80, smem_bytes=200 * 1024),  # too big for sm_80: the autotuner skips it, reported
    ])
    assert [r["gate"] for r in rows] == ["", "no_spills", "", "tensor_cores_in_main_loop", "", "compiles",
                                         "shared_memory_fits", ""]
    assert rows[7]["missed"] == "shared_memory_fits_sm80"


def test_sm90_needs_wgmma_in_the_main_loop_and_sm80_mma_sync():
    # an sm_90 GEMM or attention loop that fell back to mma.sync (HMMA only) fails the gate
    rows = codegen.evaluate([
        _row(loop_tc=4, loop_hgmma=0),
        _row(kernel="_flash_attention_kernel", loop_tc=8, loop_hgmma=0),
        _row(kernel="_flash_attention_kernel", loop_tc=8, loop_hgmma=8),
        _row(arch=80, loop_tc=4, loop_hgmma=0),  # sm_80 has no wgmma: HMMA is its rule
        _row(arch=80, loop_tc=0, loop_hgmma=0),
        _row(kernel="_tome_best_match_kernel", loop_tc=4, loop_hgmma=0),  # not a GEMM/attention kind
    ])
    assert [r["gate"] for r in rows] == ["tensor_cores_in_main_loop", "tensor_cores_in_main_loop", "", "",
                                         "tensor_cores_in_main_loop", ""]
    hmma = codegen.sass_facts(SASS.replace("HGMMA.64x128x16.F32.BF16", "HMMA.16816.F32.BF16"))
    assert hmma["loop_tc"] == 1 and hmma["loop_hgmma"] == 0
    assert codegen.sass_facts(SASS)["loop_hgmma"] == 1


def test_targets_are_reported_not_failed_and_compare_norm_gemm_with_plain_gemm():
    rows = codegen.evaluate([
        _row(kernel="_flash_attention_kernel", loop_instructions=1189, loop_cp_async=False,
             loop_widest_load_bits=16),
        _row(kernel="_linear_residual_kernel", loop_instructions=96),
        _row(kernel="_norm_linear_kernel", loop_instructions=344),
        _row(kernel="_norm_linear_kernel", loop_instructions=110, config="M128 N128"),
    ])
    assert all(r["gate"] == "" for r in rows)
    assert rows[0]["missed"] == "attention_loop_instructions attention_async_16B_loads"
    assert [r["missed"] for r in rows[1:]] == ["", "norm_gemm_loop_vs_plain_gemm", ""]
    gated_rule = {**codegen.RULES["attention_loop_instructions"], "level": "gate"}
    promoted = {**codegen.RULES, "attention_loop_instructions": gated_rule}
    assert codegen.evaluate([_row(kernel="_flash_attention_kernel", loop_instructions=501)],
                            promoted)[0]["gate"] == "attention_loop_instructions"


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   LDG.E.U16 R6, desc[UR4][R8.64] ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/              @P0  BRA `(.L_x_0) ;
.L_x_1:
        /*0050*/                   LDG.E.128 R8, desc[UR4][R10.64] ;
        /*0060*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0070*/                   LDG.E.128 R12, desc[UR4][R10.64+0x10] ;
        /*0080*/               @P1 BRA `(.L_x_1) ;
        /*0090*/                   EXIT ;
"""


def test_sass_main_loop_is_the_one_with_tensor_cores():
    facts = codegen.sass_facts(SASS)
    assert facts["tc_instructions"] == 1 and facts["cp_async"] and not facts["tma"]
    assert facts["loop_instructions"] == 4 and facts["loop_tc"] == 1
    assert (facts["loop_widest_load_bits"], facts["loop_narrowest_load_bits"]) == (128, 16)
    without_mma = codegen.sass_facts(SASS.replace("HGMMA.64x128x16.F32.BF16", "FFMA"))
    # no tensor cores anywhere: the loop with the most global loads is the main loop
    assert without_mma["loop_tc"] == 0 and without_mma["loop_instructions"] == 4
    assert codegen.sass_facts("")["loop_instructions"] is None


def test_cuobjdump_sass_branches_by_address_and_kernel_names():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                    /* 0x000fe40000000f00 */
        /*0010*/                   LDG.E.U16 R2, desc[UR4][R4.64] ;         /* 0x000ea8000c1e1500 */
        /*0020*/                   STG.E.U16 desc[UR4][R6.64], R2 ;         /* 0x000fe2000c101504 */
        /*0030*/              @!P0 BRA 0x10 ;                                /* 0x000fea000383ffff */
        /*0040*/                   EXIT ;                                    /* 0x000fea0003800000 */
    """
    facts = codegen.sass_facts(sass)
    assert facts["loop_instructions"] == 3 and facts["loop_narrowest_load_bits"] == 16
    row = codegen.evaluate([{**_row(workloads="csrc/cuda", kernel="bias_gelu_kernel"), **facts}])[0]
    assert row["gate"] == "" and row["missed"] == "cuda_no_scalar_16bit_loads"
    mangled = "_ZN5dcvit22layer_norm_rows_kernelIN3c108BFloat16EEEvPKT_S5_S5_PS3_lf"
    assert (codegen._demangle(mangled), codegen._cuda_dtype(mangled)) == ("layer_norm_rows_kernel", "bf16")
    assert codegen._cuda_dtype("_ZN5dcvit16bias_gelu_kernelIfEEvPKT_S3_PS1_ll") == "fp32"


def test_a_waiver_turns_one_gate_failure_into_a_reported_miss():
    waivers = {("no_spills", "_flash_attention_kernel", "ALIGNED=False"): "issue 10"}
    rows = codegen.evaluate([_row(kernel="_flash_attention_kernel", variant="UNIFORM=False ALIGNED=False",
                                  spill_bytes=160),
                             _row(kernel="_flash_attention_kernel", variant="ALIGNED=True", spill_bytes=8)],
                            waivers=waivers)
    assert rows[0]["gate"] == "" and "no_spills (waived: issue 10)" in rows[0]["missed"]
    assert rows[1]["gate"] == "no_spills"

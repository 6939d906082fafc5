"""Deployable MoE: one config for offload budget, expert bits and dynamic top-k, saved into an artifact
and restored by `pocketlm.load`; the same options on generate, chat, eval and serve."""
import json

import pytest

import pocketlm
from pocketlm.errors import ConfigError
from pocketlm.moe.block import MoEBlock
from pocketlm.moe.deploy import MoEDeployConfig, deploy, plan, save_deploy
from pocketlm.runtime import Generator
from test_cli import assert_bad_input, run

PROMPT = "the machine"


def greedy(model, tok, n=12):
    return Generator(model, tok).generate(PROMPT, max_tokens=n)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """An artifact of `moe` with a quarter of its experts resident, a 6 MB 8/4-bit plan and top-p 0.8."""
    out = tmp_path_factory.mktemp("deploy") / "art"
    model, tok = pocketlm.load("moe")
    cfg = plan(model, tok, MoEDeployConfig(resident=0.25, bits_budget_mb=6, top_p=0.8, calib_samples=2),
               show_progress=False)
    save_deploy(model, tok, cfg, out)
    return out, cfg


def test_load_restores_the_saved_deployment(deployed):
    out, cfg = deployed
    bits = [b for layer in cfg.bits for b in layer]
    assert 8 in bits and 4 in bits  # the budget buys some 8-bit experts, not all
    model, tok = pocketlm.load(out)
    rt = model.pocketlm_moe
    assert rt.config == cfg  # the plan comes back as saved: no second calibration
    assert all(isinstance(b, MoEBlock) and b.routing.top_p == 0.8 for b in rt.blocks)
    assert rt.cache.budget < 0.3 * rt.cache.total_bytes
    assert [[e[0] for e in layer] for layer in rt.cache.store.layout] == cfg.bits
    restored = greedy(model, tok)
    again, _ = pocketlm.load("moe")
    deploy(again, cfg)  # the same deployment applied by hand gives the same tokens
    assert greedy(again, tok) == restored
    rt.close()


def test_overrides_change_the_saved_deployment(deployed):
    out, cfg = deployed
    model, _ = pocketlm.load(out, moe={"expert_memory_mb": 4.0})
    rt = model.pocketlm_moe
    assert rt.cache.budget == 4 * 2**20 and rt.config.resident is None and rt.config.bits == cfg.bits
    rt.close()
    plain, _ = pocketlm.load(out, moe=False)
    assert not hasattr(plain, "pocketlm_moe") and not any(isinstance(m, MoEBlock) for m in plain.modules())
    with pytest.raises(ConfigError, match="both"):
        MoEDeployConfig(resident=0.5, expert_memory_mb=4)


def test_generate_with_offload_equals_all_resident(capsys):
    code, offloaded, err = run(["generate", "moe", PROMPT, "--max-tokens", "12", "--resident-experts", "0.25"], capsys)
    assert code == 0, err
    code, resident, err = run(["generate", "moe", PROMPT, "--max-tokens", "12"], capsys)
    assert code == 0, err
    assert offloaded == resident  # offloading alone is exact; bits and dynamic top-k are what change tokens


def test_moe_deploy_command_and_eval_of_its_artifact(tmp_path, capsys):
    art = tmp_path / "art"
    code, stdout, err = run(["moe", "deploy", "moe", "-o", str(art), "--resident-experts", "12",
                             "--moe-threshold", "0.3"], capsys)
    assert code == 0, err
    record = json.loads((art / "pocketlm.json").read_text())["moe_deploy"]
    assert record["resident"] == 12 and record["threshold"] == 0.3 and record["bits"] is None
    report = tmp_path / "r.json"
    code, stdout, err = run(["eval", str(art), "--tokens", "1024", "--no-speed", "--json", str(report)], capsys)
    assert code == 0, err
    active = json.loads(report.read_text())["quality"]["routing"]["mean_active_experts"]
    assert 1 <= active < 2  # dynamic top-k ran: fewer than the model's two experts per token


def test_moe_options_bad_input(tmp_path, capsys):
    assert_bad_input(["generate", "tiny", "hi", "--resident-experts", "0.5"], capsys, tmp_path,
                     "no sparse mixture-of-experts")
    assert_bad_input(["generate", "moe", "hi", "--moe-top-p", "1.5"], capsys, tmp_path, "top_p")
    assert_bad_input(["chat", "moe", "--resident-experts", "0.5", "--expert-memory-mb", "4"], capsys, tmp_path,
                     "both")
    assert_bad_input(["moe", "deploy", "moe", "-o", str(tmp_path / "x"), "--expert-bits-mb", "0.5"], capsys,
                     tmp_path, "below the experts")


def test_a_later_pass_keeps_the_deployment_but_drops_the_stale_bit_plan(deployed, tmp_path, capsys):
    out, cfg = deployed
    code, _, err = run(["compress", str(out), "-o", str(tmp_path / "q"), "--method", "rtn", "--bits", "8"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "q" / "pocketlm.json").read_text())["moe_deploy"]
    assert record["resident"] == cfg.resident and record["bits_budget_mb"] == 6 and record["bits"] is None

"""The CLI: a table and JSON for good input; one line, exit code 2 and nothing written for bad input."""
import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from pocketlm.cli import main
from pocketlm.io import ASSETS

TINY = ASSETS / "models" / "tiny"
QUICK = ["--tokens", "1024", "--no-speed"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def model_copy(tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(TINY, dst)
    return dst


def assert_bad_input(argv, capsys, tmp_path, *needles):
    out_json = tmp_path / "out" / "result.json"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run([*argv, "--json", str(out_json)] if argv[0] == "eval" else argv, capsys)
    assert code == 2, (out, err)
    message = err.strip()
    assert message.startswith("error:") and "\n" not in message, err
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"
    return message


def test_eval_writes_table_and_json(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    main_ok = ["eval", "tiny", "--baseline", "tiny", *QUICK, "--json", str(out_json)]
    try:
        main(main_ok)
    except SystemExit as e:
        assert e.code in (0, None)
    out = capsys.readouterr().out
    assert "tiny-float32" in out and "ppl" in out
    report = json.loads(out_json.read_text())
    for key in ("ppl", "kl", "top1", "cloze"):
        assert key in report["quality"]
    assert report["quality"]["kl"] == pytest.approx(0, abs=1e-6) and report["quality"]["top1"] == 1.0
    for key in ("weights_mb", "peak_rss_mb", "prefill_ms", "decode_tok_s"):
        assert key in report["efficiency"]
    assert report["protocol"]["tokens"] == 1024 and report["protocol"]["speed"] is False


def test_missing_model_path(tmp_path, capsys):
    assert_bad_input(["eval", str(tmp_path / "nope")], capsys, tmp_path, "no model directory", "nope")


def test_truncated_weights(tmp_path, capsys):
    src = model_copy(tmp_path)
    w = src / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    assert_bad_input(["eval", str(src), *QUICK], capsys, tmp_path, "corrupt or truncated", "model.safetensors")


def test_unsupported_architecture(tmp_path, capsys):
    src = model_copy(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="bert", architectures=["BertForMaskedLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(["eval", str(src), *QUICK], capsys, tmp_path, "unsupported architecture 'bert'", "supports")


def test_tokenizer_mismatch(tmp_path, capsys):
    src = model_copy(tmp_path)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(["<only-here>"])
    tok.save_pretrained(src)
    assert_bad_input(["eval", "tiny", "--baseline", str(src), *QUICK], capsys, tmp_path,
                     "tokenizer of the baseline", "same tokenizer")


def test_empty_text(tmp_path, capsys):
    text = tmp_path / "empty.txt"
    text.write_text("  \n")
    assert_bad_input(["eval", "tiny", "--text", str(text), *QUICK], capsys, tmp_path, "is empty")


def test_too_short_text(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("In the beginning God created the heaven and the earth.")
    assert_bad_input(["eval", "tiny", "--text", str(text), *QUICK], capsys, tmp_path,
                     "fewer than one window of 512", "--ctx")


def test_missing_text(tmp_path, capsys):
    assert_bad_input(["eval", "tiny", "--text", str(tmp_path / "nope.txt"), *QUICK], capsys, tmp_path,
                     "does not exist")


@pytest.mark.parametrize("option,needle", [
    (["--ctx", "0"], "--ctx must be at least 2"),
    (["--tokens", "100"], "smaller than one window"),
    (["--repeats", "0"], "repeats must be at least 1"),
    (["--batch-sizes", "1,x"], "comma-separated list"),
    (["--batch-sizes", "0"], "batch sizes must be positive"),
    (["--dtype", "int3"], "unknown dtype 'int3'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--watts-per-core", "-1"], "watts_per_core must be positive"),
])
def test_bad_option_values(tmp_path, capsys, option, needle):
    assert_bad_input(["eval", "tiny", "--no-speed", *option], capsys, tmp_path, needle)


def test_tasks_on_a_model_without_chat_template(tmp_path, capsys):
    src = model_copy(tmp_path)
    (src / "chat_template.jinja").unlink()
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    tasks = ASSETS / "data" / "arith_test.jsonl"
    assert_bad_input(["eval", str(src), "--tasks", str(tasks), *QUICK], capsys, tmp_path, "chat template")


def test_bad_task_file(tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"question": "What is 1+1?"}\n')
    assert_bad_input(["eval", "reasoner", "--tasks", str(tasks), *QUICK], capsys, tmp_path, "line 1", "answer")


def test_report_rejects_non_report_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert_bad_input(["report", str(bad), "-o", str(tmp_path / "rep")], capsys, tmp_path,
                     "bad.json", "pocketlm eval --json")


def test_demo_refuses_existing_output(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    assert_bad_input(["demo", "-o", str(out)], capsys, tmp_path, "already exists", "--overwrite")
    assert list(out.iterdir()) == []


def test_usage_error_is_exit_2(capsys):
    code, _, err = run(["eval", "tiny", "--tokens", "many"], capsys)
    assert code == 2 and "--tokens" in err


def test_console_script_one_line_and_debug_traceback(tmp_path):
    cmd = [sys.executable, "-m", "pocketlm.cli", "eval", str(tmp_path / "missing")]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_truncated_baseline_fails_before_any_work(tmp_path, capsys):
    src = model_copy(tmp_path)
    w = src / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    assert_bad_input(["eval", "tiny", "--baseline", str(src), "--tokens", "1024"], capsys, tmp_path,
                     "corrupt or truncated")


def test_corrupt_tokenizer(tmp_path, capsys):
    src = model_copy(tmp_path)
    (src / "tokenizer.json").write_text("{garbage")
    assert_bad_input(["eval", str(src), *QUICK], capsys, tmp_path, "cannot load", "tokenizer")


def test_compress_writes_an_artifact_with_its_recipe(tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, _ = run(["compress", "tiny", "-o", str(out), "--prune", "wanda", "--sparsity", "0.5",
                           "--calib-samples", "4", "--calib-len", "128"], capsys)
    assert code == 0 and "prune_wanda" in stdout
    record = json.loads((out / "pocketlm.json").read_text())
    assert record["recipe"][0]["kind"] == "prune_wanda" and record["recipe"][0]["stats"]["sparsity"] == 0.5
    assert record["calibration_hash"].startswith("sha256:")


@pytest.mark.parametrize("options,needle", [
    (["--prune", "magnitude", "--sparsity", "1.0"], "sparsity 1.0 is outside [0, 1)"),
    (["--prune", "wanda", "--nm", "2:3"], "divisible by 3"),
    (["--prune", "wanda", "--nm", "2-4"], "N:M"),
    (["--prune", "layers", "--drop", "4"], "remove all 4 layers"),
    (["--prune", "width", "--target-params", "20M"], "not below the model"),
    (["--prune", "width"], "needs --target-params"),
    (["--prune", "heads", "--ratio", "1.5"], "outside (0, 1)"),
    (["--prune", "blocks"], "unknown --prune method"),
])
def test_compress_bad_input(tmp_path, capsys, options, needle):
    assert_bad_input(["compress", "tiny", "-o", str(tmp_path / "out"), "--calib-samples", "4", "--calib-len", "64",
                      *options], capsys, tmp_path, needle)


def test_compress_empty_calibration_text(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n")
    assert_bad_input(["compress", "tiny", "-o", str(tmp_path / "out"), "--prune", "wanda", "--calib", str(calib)],
                     capsys, tmp_path, "calibration text", "is empty")


def test_compress_refuses_to_write_into_its_input(tmp_path, capsys):
    src = model_copy(tmp_path)
    assert_bad_input(["compress", str(src), "-o", str(src / "pruned"), "--prune", "magnitude", "--overwrite"],
                     capsys, tmp_path, "input model")


def test_generate_prints_the_greedy_completion(capsys):
    from pocketlm import load
    from pocketlm.runtime import Generator
    code, out, err = run(["generate", "tiny", "And God said", "--max-tokens", "12"], capsys)
    assert code == 0, err
    assert out.rstrip("\n") == Generator(*load("tiny")).generate("And God said", 12)
    assert "generated 12 tokens" in err


def test_generate_streams_and_stops_at_a_string(capsys):
    code, out, err = run(["generate", "tiny", "And God said", "--max-tokens", "40", "--stream", "--stop", ","],
                         capsys)
    assert code == 0 and "," not in out and "finish: stop" in err


def test_bench_writes_json_with_ratios(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code, out, err = run(["bench", "tiny", "--eager", "--transformers", "--repeats", "1", "--batch-sizes", "1,2",
                          "--new-tokens", "8", "--prefill-tokens", "64", "--json", str(out_json)], capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    engines = [r["engine"] for r in result["rows"]]
    assert engines == ["pocketlm (eager)", "transformers.generate"]
    assert set(result["speedup_vs_transformers"]) == {"1", "2"} and result["compile_s"] is None
    assert "speed-up" in out


def test_bench_and_generate_run_the_native_step(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code, out, err = run(["bench", "tiny", "--native", "--repeats", "1", "--batch-sizes", "1", "--new-tokens", "8",
                          "--prefill-tokens", "32", "--json", str(out_json)], capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["path"] == "native" and result["rows"][0]["engine"] == "pocketlm (native)"
    assert "native step" in out
    code, native_out, _ = run(["generate", "tiny", "And God said", "--max-tokens", "12", "--native"], capsys)
    code_eager, eager_out, _ = run(["generate", "tiny", "And God said", "--max-tokens", "12"], capsys)
    assert code == code_eager == 0 and native_out == eager_out  # greedy: the same text


@pytest.mark.parametrize("argv, needle", [
    (["generate", "tiny", "x", "--max-tokens", "4000"], "exceed the context"),
    (["generate", "tiny", "x", "--temperature", "-1"], "temperature"),
    (["generate", "tiny", "", "--max-tokens", "3"], "no tokens"),
    (["bench", "tiny", "--batch-sizes", "0"], "batch sizes"),
    (["bench", "tiny", "--new-tokens", "3000"], "context"),
    (["generate", "tiny", "x", "--threads", "0"], "--threads"),
])
def test_generate_and_bench_bad_input(argv, needle, capsys, tmp_path):
    assert_bad_input(argv, capsys, tmp_path, needle)


QUANT = ["--method", "rtn", "--group-size", "32"]


@pytest.mark.parametrize("bits, qtype", [(8, "Q8_0"), (4, "Q4_0")])
def test_compress_quantizes_and_exports_gguf(tmp_path, capsys, bits, qtype):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "q"
    code, stdout, err = run(["compress", "tiny", "-o", str(out), *QUANT, "--bits", str(bits), "--export", "gguf"],
                            capsys)
    assert code == 0, err
    record = json.loads((out / "pocketlm.json").read_text())["recipe"][0]
    assert (record["kind"], record["bits"], record["head"]) == ("rtn", bits, True)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["model.layers.0.mlp.up_proj"]["bits"] == bits and modules["lm_head"]["bits"] == 8
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors if len(t.shape) == 2}
    assert types == {qtype}
    assert f"GGUF {qtype}" in stdout and "re-quantized" in stdout


def test_compress_calib_tokens_sets_the_sequences(tmp_path, capsys, monkeypatch):
    import pocketlm.compress
    seen = {}
    real = pocketlm.compress.compress_

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(pocketlm.compress, "compress_", spy)
    code, _, err = run(["compress", "tiny", "-o", str(tmp_path / "p"), "--prune", "wanda", "--calib-tokens", "300",
                        "--calib-len", "64"], capsys)
    assert code == 0, err
    assert (seen["calib_samples"], seen["calib_len"]) == (4, 64)  # 300 // 64


@pytest.mark.parametrize("options,needle", [
    ([], "exactly one of --recipe, --prune or --method"),
    (["--prune", "wanda", "--method", "rtn"], "exactly one of --recipe, --prune or --method"),
    (["--method", "rtn", "--bits", "5"], "rtn supports (8, 4, 3) bits, not 5"),
    (["--method", "rtn", "--group-size", "48"], "group size 48 is not one of"),
    (["--method", "blocks"], "unknown --method 'blocks'"),
    (["--method", "rtn", "--target-bits", "4"], "does not take --target-bits"),
    (["--method", "mixed", "--bits", "4"], "does not take --bits"),
    (["--method", "smoothquant", "--sym"], "does not take --sym"),
    (["--prune", "wanda", "--bits", "4"], "--bits is a quantization option"),
    ([*QUANT, "--calib-tokens", "10", "--calib-len", "64"], "less than one sequence of 64"),
    ([*QUANT, "--calib-samples", "4", "--calib-tokens", "256"], "both given"),
    ([*QUANT, "--export", "onnx"], "unknown --export format 'onnx'"),
    ([*QUANT, "--export", "gguf", "--gguf-type", "Q5_K"], "GGUF type Q5_K is not supported"),
    ([*QUANT, "--gguf-type", "Q8_0"], "without --export gguf"),
])
def test_compress_quant_bad_input(tmp_path, capsys, options, needle):
    assert_bad_input(["compress", "tiny", "-o", str(tmp_path / "out"), *options], capsys, tmp_path, needle)


@pytest.mark.parametrize("method, options, needle", [
    ("awq", ["--bits", "8"], "awq supports"),
    ("gptq", ["--bits", "2"], "gptq supports"),
    ("awq", ["--then", "hqq"], "unknown rounding 'hqq'"),
    ("gptq", ["--then", "gptq"], "does not take --then"),
])
def test_compress_options_the_method_does_not_take(tmp_path, capsys, method, options, needle):
    pytest.importorskip(f"pocketlm.compress.quant.{method}")
    assert_bad_input(["compress", "tiny", "-o", str(tmp_path / "out"), "--method", method, "--group-size", "32",
                      *options], capsys, tmp_path, needle)


def test_compress_quant_empty_calibration_text(tmp_path, capsys):
    pytest.importorskip("pocketlm.compress.quant.gptq")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n")
    assert_bad_input(["compress", "tiny", "-o", str(tmp_path / "out"), "--method", "gptq", "--group-size", "32",
                      "--calib", str(calib)], capsys, tmp_path, "calibration text", "is empty")


def test_compress_refuses_a_model_with_nothing_left_to_quantize(tmp_path, capsys):
    import pocketlm
    from pocketlm.compress import RTNConfig
    model, tok = pocketlm.load("tiny")
    pocketlm.compress_(model, RTNConfig(bits=8), tok=tok)
    src = pocketlm.save(model, tok, tmp_path / "int8")  # every decoder linear is already a QuantLinear
    assert_bad_input(["compress", str(src), "-o", str(tmp_path / "again"), *QUANT], capsys, tmp_path,
                     "no plain linear layers")


def test_compress_export_refuses_an_architecture_gguf_cannot_hold(tmp_path, capsys):
    assert_bad_input(["compress", "moe", "-o", str(tmp_path / "out"), "--method", "rtn", "--bits", "8",
                      "--export", "gguf"], capsys, tmp_path, "GGUF export supports llama/mistral", "mixtral")


def test_compress_export_refuses_rows_gguf_blocks_cannot_hold(tmp_path, capsys):
    # int8 rows of 48 weights are a valid pocketlm quantization, but Q8_0 stores whole blocks of 32
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("llama", hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                               num_key_value_heads=1, intermediate_size=96, vocab_size=8192)
    src = tmp_path / "narrow"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(src)
    assert_bad_input(["compress", str(src), "-o", str(tmp_path / "out"), "--method", "rtn", "--bits", "8",
                      "--export", "gguf"], capsys, tmp_path, "Q8_0 stores blocks of 32", "rows of 48")

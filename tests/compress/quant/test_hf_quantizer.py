import copy
import json
import shutil
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

import pocketlm
from pocketlm.compress.quant.linear import QuantEmbedding, QuantLinear
from pocketlm.compress.quant.rtn import RTNConfig


def test_from_pretrained_matches_pocketlm_load(rtn_artifact):
    cfg, _, out = rtn_artifact
    ours, _ = pocketlm.load(out)
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    x = torch.randint(0, 8192, (2, 20))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ours(x).logits)
    down = hf.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.bits == cfg.bits and down.kernel_layout
    n_quant = sum(isinstance(m, QuantLinear) for m in ours.modules())
    assert n_quant > 0 and sum(isinstance(m, QuantLinear) for m in hf.modules()) == n_quant
    if cfg.head:
        assert isinstance(hf.lm_head, QuantLinear) and isinstance(hf.model.embed_tokens, QuantEmbedding)
        assert hf.model.embed_tokens.table[0] is hf.lm_head  # tied: one int8 table
    else:
        assert type(hf.lm_head) is torch.nn.Linear and hf.lm_head.weight is hf.model.embed_tokens.weight
    assert hf.is_quantized and not hf.hf_quantizer.is_trainable


def test_save_pretrained_of_a_loaded_model_round_trips(tmp_path, tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    pocketlm.compress_(model, RTNConfig(bits=4, group_size=32, head=True), tok=tok)
    out = pocketlm.save(model, tok, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf.save_pretrained(tmp_path / "again")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(out / f, tmp_path / "again")
    qcfg = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert qcfg == json.loads((out / "config.json").read_text())["quantization_config"]
    again, _ = pocketlm.load(tmp_path / "again")
    x = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_import_pocketlm_registers_lazily():
    code = ("import sys, pocketlm; assert 'transformers.quantizers.auto' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; print(M['pocketlm'].__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "PocketlmHfQuantizer", done.stderr

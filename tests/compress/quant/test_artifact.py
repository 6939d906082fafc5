import copy
import json

import torch

import pocketlm
from pocketlm.compress.quant.linear import QuantEmbedding, QuantLinear
from pocketlm.compress.quant.rtn import RTNConfig


def test_quantized_artifact_reloads_bit_exactly(rtn_artifact):
    cfg, model, out = rtn_artifact
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "pocketlm"
    assert qcfg["modules"]["model.layers.0.mlp.down_proj"]["bits"] == cfg.bits
    again, _ = pocketlm.load(out)
    x = torch.randint(0, 8192, (2, 20))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    if cfg.head:
        assert again.model.embed_tokens.table[0] is again.lm_head
        assert isinstance(again.model.embed_tokens, QuantEmbedding)
    assert sum(isinstance(m, QuantLinear) for m in again.modules()) == sum(
        isinstance(m, QuantLinear) for m in model.modules())


def test_fewer_bits_make_a_smaller_artifact(tmp_path, tiny):
    sizes = {}
    for bits in (8, 4, 3):
        model, tok = copy.deepcopy(tiny[0]), tiny[1]
        pocketlm.compress_(model, RTNConfig(bits=bits, group_size=32, head=True), tok=tok)
        out = pocketlm.save(model, tok, tmp_path / str(bits))
        sizes[bits] = (out / "model.safetensors").stat().st_size
    assert sizes[8] > sizes[4] > sizes[3]

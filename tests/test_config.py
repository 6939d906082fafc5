import pytest

from pocketlm.config import config_from_dict, config_from_yaml
from pocketlm.errors import ConfigError
from pocketlm.eval.protocol import EvalProtocol


def test_protocol_roundtrips_through_dict_and_yaml():
    p = EvalProtocol(tokens=2048, ctx=256, decode_batch_sizes=(1, 4), tasks="x.jsonl")
    assert config_from_dict(p.to_dict()) == p
    assert config_from_yaml(p.to_yaml(), EvalProtocol) == p


def test_defaults_follow_the_design():
    p = EvalProtocol()
    assert (p.tokens, p.ctx, p.decode_prompt_tokens, p.decode_new_tokens, p.prefill_tokens, p.repeats, p.warmup) == \
        (65536, 512, 32, 128, 512, 5, 1)
    assert p.decode_batch_sizes == (1, 8)


@pytest.mark.parametrize("data,needle", [
    ({"kind": "os_system", "cmd": "rm"}, "unknown config kind"),
    ({"kind": "eval_protocol", "tokenz": 5}, "unknown eval_protocol option"),
    ({"tokens": 5}, "no 'kind'"),
    ({"kind": "eval_protocol", "ctx": 1}, "--ctx must be at least 2"),
])
def test_loading_is_allowlisted_and_validated(data, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(data)


def test_config_is_frozen():
    with pytest.raises(Exception):
        EvalProtocol().tokens = 3

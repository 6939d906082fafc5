"""Knowledge distillation: the loss, a run that learns, exact resume, and two processes (gloo)."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pocketlm
from pocketlm.compress.distill.losses import HiddenProjection, kd_loss, pair_layers
from pocketlm.compress.distill.trainer import KDConfig, check_same_tokenizer, distill, packed_sequences
from pocketlm.errors import ConfigError, DataError
from pocketlm.eval.data import read_text


def test_kd_loss_is_the_scaled_kl():
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    assert kd_loss(t, t, 2.0).abs() < 1e-6
    ls, pt = torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1)
    want = (pt * (pt.log() - ls)).sum(-1).mean() * 4
    assert torch.allclose(kd_loss(s, t, 2.0), want, atol=1e-6)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 0] = True
    assert torch.allclose(kd_loss(s, t, 2.0, mask), (pt[0, 0] * (pt[0, 0].log() - ls[0, 0])).sum() * 4, atol=1e-6)
    assert pair_layers(4, 8) == [(1, 2), (2, 4), (3, 6), (4, 8)]
    proj = HiddenProjection(4, 6, 1)
    assert proj.loss([torch.randn(2, 3, 4)], [torch.randn(2, 3, 6)]) > 0


@pytest.fixture(scope="module")
def setup(tiny):
    teacher, tok = tiny
    _, text = read_text(None)
    data = packed_sequences(tok, text[:60_000], 64)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return teacher, student, data


def kl_to_teacher(student, teacher, data):
    with torch.no_grad():
        return kd_loss(student(data[:8]).logits, teacher(data[:8]).logits).item()


def test_distillation_moves_the_student_toward_the_teacher(setup):
    teacher, student, data = setup
    student = copy.deepcopy(student)
    before = kl_to_teacher(student, teacher, data)
    out = distill(student, teacher, data, KDConfig(steps=12, batch_size=4, seq_len=64, lr=1e-3, hidden_weight=0.1),
                  show_progress=False)
    assert kl_to_teacher(student, teacher, data) < 0.7 * before
    assert len(out["loss_curve"]) == 12 and out["processes"] == 1
    assert not student.training


def test_resume_continues_exactly(setup, tmp_path):
    teacher, student, data = setup
    cfg = KDConfig(steps=6, batch_size=4, seq_len=64, checkpoint_every=3)
    straight = copy.deepcopy(student)
    distill(straight, teacher, data, cfg, show_progress=False)
    interrupted = copy.deepcopy(student)
    distill(interrupted, teacher, data, cfg.replace(steps=3), workdir=tmp_path, show_progress=False)
    resumed = copy.deepcopy(student)  # a fresh process would start from the original weights
    out = distill(resumed, teacher, data, cfg, workdir=tmp_path, resume=True, show_progress=False)
    assert out["resumed_at"] == 3 and len(out["loss_curve"]) == 6
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_two_cpu_processes(tmp_path):
    """The same distill() under torchrun with 2 processes: DDP over gloo keeps every rank's weights equal."""
    result = tmp_path / "r.pt"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("two_process_distill.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), str(script), str(result)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = torch.load(result)
    assert r["processes"] == 2 and torch.equal(r["sums"][0], r["sums"][1])


def test_bad_input(setup, tiny):
    teacher, student, data = setup
    with pytest.raises(DataError, match="no batch"):
        distill(copy.deepcopy(student), teacher, data[:2], KDConfig(batch_size=4, seq_len=64), show_progress=False)
    with pytest.raises(ConfigError, match="alpha"):
        KDConfig(alpha=1.5)

    class OtherTok:
        def get_vocab(self):
            return {"a": 0}
    with pytest.raises(ConfigError, match="cross-tokenizer"):
        check_same_tokenizer(OtherTok(), tiny[1])


def test_distill_command(setup, tiny, tmp_path, capsys):
    from test_cli import assert_bad_input, run
    _, student, _ = setup
    pocketlm.save(student, tiny[1], tmp_path / "student")
    out = tmp_path / "out"
    code, stdout, err = run(["distill", "tiny", str(tmp_path / "student"), "-o", str(out), "--steps", "3",
                             "--batch-size", "2", "--seq-len", "32"], capsys)
    assert code == 0, err
    assert "loss" in stdout
    trained, _ = pocketlm.load(out)
    assert trained.pocketlm_record["recipe"][-1]["kind"] == "kd"
    assert_bad_input(["distill", "tiny", str(tmp_path / "student"), "-o", str(tmp_path / "x"), "--alpha", "2"],
                     capsys, tmp_path, "alpha")
    assert_bad_input(["distill", "tiny", str(tmp_path / "student"), "-o", str(tmp_path / "x"), "--resume"],
                     capsys, tmp_path, "--workdir")

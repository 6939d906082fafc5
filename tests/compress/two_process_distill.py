"""Run by test_distill.py under `torchrun --nproc_per_node 2` (gloo on CPU): a short distillation, then
every rank's weight checksum, gathered, to the file given as argv[1]."""
import copy
import sys

import torch
from accelerate import Accelerator

import pocketlm
from pocketlm.compress.distill.trainer import KDConfig, distill, packed_sequences
from pocketlm.eval.data import read_text

torch.set_num_threads(1)
teacher, tok = pocketlm.load("tiny")
_, text = read_text(None)
data = packed_sequences(tok, text[:30_000], 32)
student = copy.deepcopy(teacher)
with torch.no_grad():
    for p in student.parameters():
        p.mul_(0.9)
out = distill(student, teacher, data, KDConfig(steps=3, batch_size=4, seq_len=32, hidden_weight=0.1),
              show_progress=False)
acc = Accelerator()
sums = acc.gather(torch.stack([p.detach().sum() for p in student.parameters()]).sum().reshape(1))
if acc.is_main_process:
    torch.save({"processes": out["processes"], "sums": sums}, sys.argv[1])
acc.end_training()

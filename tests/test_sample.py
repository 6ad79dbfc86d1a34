import io
from collections import Counter

import pytest
import torch

from tinygpt.common import TinyGPTError, run_cli
from tinygpt.model.gpt import GPT, GPTConfig
from tinygpt.model.sample import complete, generate, main, sample_next, text_pieces
from tinygpt.tokenizer.train_bpe import train_bpe

from builders import save_tiny_checkpoint

TEXTS = ["Once upon a time there was a little cat. The cat sat on the mat.",
         "héllo wörld, 日本語 and 🙂 emoji, the end."] * 10
BLOCK = 16


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, 300, show_progress=False)


def tiny_model(vocab_size: int = 300, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK), **overrides})
    model = GPT(config).eval()
    with torch.no_grad():  # wider weights than GPT-2's init: varied, confident predictions, not float-noise ties
        for name, p in model.named_parameters():
            if "ln_" not in name:
                p.normal_(0.0, 0.3)
    return model


def reference_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation, with the documented window rule: crop the prompt to block_size;
    when the window is full, keep its last block_size // 2 - 1 tokens, then append the new one."""
    block, keep = model.config.block_size, model.config.block_size // 2
    window, out = prompt[-block:], []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([window]))
            token = int(logits[0, -1].argmax())
            out.append(token)
            window = (window[-(keep - 1):] if len(window) == block else window) + [token]
    return out


@pytest.mark.parametrize("arch", [{}, {"arch": "llama", "n_kv_head": 1}])  # llama with grouped-query attention
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("prompt_len, n_new", [(5, 8), (3, 50), (40, 30)])  # inside, past, and beyond the context
def test_greedy_with_and_without_cache_equals_reference(attention, prompt_len, n_new, arch):
    model = tiny_model(attention=attention, **arch)
    prompt = torch.randint(0, 300, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    expected = reference_greedy(model, prompt, n_new)
    assert list(generate(model, prompt, n_new, temperature=0, use_cache=True)) == expected
    assert list(generate(model, prompt, n_new, temperature=0, use_cache=False)) == expected


def test_inside_the_context_greedy_is_plain_argmax_over_the_full_sequence():
    model = tiny_model()
    tokens = [1, 2, 3]
    out = list(generate(model, tokens, BLOCK - 3, temperature=0))
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens + out]))
    assert out == logits[0, 2:-1].argmax(-1).tolist()


def test_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model()

    def run(seed: int, **kw) -> list[int]:
        return list(generate(model, [5], 30, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw))

    assert run(1) == run(1) == run(1, use_cache=False)
    assert run(1) != run(2)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = tiny_model()
    greedy = list(generate(model, [7, 8], 20, temperature=0))
    gen = torch.Generator().manual_seed(0)
    assert list(generate(model, [7, 8], 20, temperature=2.0, top_k=1, generator=gen)) == greedy
    assert list(generate(model, [7, 8], 20, temperature=2.0, top_p=1e-6, generator=gen)) == greedy


def draw(logits: list[float], n: int = 4000, **kw) -> Counter:
    gen = torch.Generator().manual_seed(0)
    kw = {**dict(temperature=1.0, top_k=0, top_p=1.0), **kw}
    return Counter(sample_next(torch.tensor(logits), generator=gen, **kw) for _ in range(n))


def test_sample_next_follows_softmax_top_k_and_top_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    counts = draw(logits)
    for token, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert counts[token] / 4000 == pytest.approx(p, abs=0.03)
    assert set(draw(logits, top_k=2)) == {0, 1}
    assert draw(logits, top_k=2)[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(draw(logits, top_p=0.7)) == {0, 1}  # 0.5 < 0.7, so the 0.3 token is still needed
    assert set(draw(logits, top_p=0.5)) == {0}
    assert set(draw(logits, top_p=0.81)) == {0, 1, 2}
    sharp = draw(logits, temperature=0.25)
    assert sharp[0] / 4000 == pytest.approx(0.5**4 / sum(p**4 for p in [0.5, 0.3, 0.15, 0.05]), abs=0.03)
    assert draw(logits, n=1, temperature=0) == {0: 1}


def test_generation_stops_before_end_of_text():
    model = tiny_model()
    first = next(generate(model, [3], 5, temperature=0))
    assert list(generate(model, [3], 5, temperature=0, eot_id=first)) == []
    assert list(generate(model, [3], 0, temperature=0)) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature=-0.1"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(max_new_tokens=-3), "max_tokens=-3"),
    ],
)
def test_bad_sampling_settings_fail_at_the_call(kwargs, message):
    args = {**dict(max_new_tokens=5), **kwargs}
    with pytest.raises(TinyGPTError, match=message):
        generate(tiny_model(), [1], **args)  # not iterated: the check must not wait for the first token


def test_text_pieces_hold_back_incomplete_characters(tokenizer):
    byte_ids = list("日🙂".encode())  # ids < 256 are single bytes: every character split over several tokens
    pieces = list(text_pieces(tokenizer, byte_ids))
    assert pieces == ["日", "🙂"]
    assert list(text_pieces(tokenizer, byte_ids[:-1])) == ["日", "\ufffd"]  # a cut-off character at the very end


def test_complete_joins_to_the_decoded_tokens(tokenizer):
    model = tiny_model()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ids = list(generate(model, tokenizer.encode("héllo"), 40, temperature=1.0, generator=gen(),
                        eot_id=tokenizer.eot_id))
    text = "".join(complete(model, tokenizer, "héllo", 40, temperature=1.0, generator=gen()))
    assert text == tokenizer.decode(ids)


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    model = tiny_model(tokenizer.vocab_size)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model, tokenizer), model


def test_cli_greedy_prints_prompt_and_completion(checkpoint, tokenizer, capsys):
    path, model = checkpoint
    argv = ["--checkpoint", str(path), "--prompt", "Once upon", "--max_tokens", "30", "--temperature", "0",
            "--device", "cpu"]
    main(argv)
    plain = capsys.readouterr().out
    ids = list(generate(model, tokenizer.encode("Once upon"), 30, temperature=0, eot_id=tokenizer.eot_id))
    assert plain == "Once upon" + tokenizer.decode(ids) + "\n"
    main(argv + ["--stream"])
    assert capsys.readouterr().out == plain
    main(argv + ["--no_cache"])
    assert capsys.readouterr().out == plain


def test_cli_samples_a_llama_checkpoint(tokenizer, tmp_path, capsys):
    model = tiny_model(tokenizer.vocab_size, arch="llama", n_kv_head=1, tie_embeddings=False)
    path = save_tiny_checkpoint(tmp_path / "llama.pt", model, tokenizer)
    main(["--checkpoint", str(path), "--prompt", "the cat", "--max_tokens", "20", "--temperature", "0"])
    ids = list(generate(model, tokenizer.encode("the cat"), 20, temperature=0, eot_id=tokenizer.eot_id))
    assert len(ids) > 5 and capsys.readouterr().out == "the cat" + tokenizer.decode(ids) + "\n"


def test_cli_seeded_sampling_is_reproducible(checkpoint, capsys):
    path, _ = checkpoint
    argv = ["--checkpoint", str(path), "--max_tokens", "25", "--top_k", "20", "--top_p", "0.9", "--seed", "7"]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert capsys.readouterr().out == first


def test_cli_interactive_reads_prompts_until_an_empty_line(checkpoint, tokenizer, capsys, monkeypatch):
    path, model = checkpoint
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\nOnce\n\nnever read\n"))
    main(["--checkpoint", str(path), "--interactive", "--max_tokens", "10", "--temperature", "0"])
    lines = capsys.readouterr().out.splitlines(keepends=True)
    expected = ["".join(complete(model, tokenizer, p, 10, temperature=0)) + "\n" for p in ("the cat", "Once")]
    assert "".join(lines) == "".join(expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
        (["--gguf", "missing.gguf"], "GGUF file not found: missing.gguf"),
        (["--checkpoint", "missing.pt", "--top_p", "2"], "top_p=2.0"),
    ],
)
def test_cli_bad_input_is_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_checkpoint_and_gguf_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "a.pt", "--gguf", "b.gguf"])
    assert exit_info.value.code == 2

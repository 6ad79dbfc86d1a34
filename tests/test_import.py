"""Importing and exporting the families tinygpt runs, against transformers and llama.cpp.

transformers builds random-weight models from each family's real configuration, shrunk (GPT-2; SmolLM2's
Llama, tied, grouped-query; Llama 3.1's, untied, with rope_scaling llama3; Qwen2.5's, with q/k/v biases and an
MLP width that is no multiple of 256), saved with save_pretrained. We read them, compare logits, export them
back to Hugging Face and GGUF, and check the files with transformers and llama.cpp.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from builders import corpus, printable, save_tiny_checkpoint, tiny_tokenizer
from llama_tools import llama_tool

from tinygpt.common import TinyGPTError
from tinygpt.export.gguf_convert import convert_to_gguf
from tinygpt.export.hf import export_hf
from tinygpt.model.gpt import GPT
from tinygpt.model.sample import generate
from tinygpt.weights.read import read_model

transformers = pytest.importorskip("transformers")

SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# family -> (config class, settings): the real models' settings with the sizes shrunk
FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, activation_function="gelu_new")),
    "smollm2": ("LlamaConfig", dict(SHAPE, num_key_value_heads=2, intermediate_size=256, rms_norm_eps=1e-5,
                                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                                    tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", dict(SHAPE | {"max_position_embeddings": 16384}, num_key_value_heads=2, intermediate_size=256, rms_norm_eps=1e-5,
                                   rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0}, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(SHAPE, num_key_value_heads=2, intermediate_size=352, rms_norm_eps=1e-6,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                  tie_word_embeddings=True, use_sliding_window=False)),
}
PROMPT = "Once upon a time, a little"


def hf_model(family: str, seed: int = 0):
    """A random transformers model of `family`: weights spread (std 0.15) so greedy decoding has no near-ties,
    norms and biases non-trivial, tokens that are not printable characters shrunk (comparable greedy text)."""
    tokenizer = tiny_tokenizer()
    config_class, settings = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=tokenizer.vocab_size, **settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
            else:
                p.normal_(0.0, 0.1 if name.endswith("bias") else 0.15)
        rows = [i for i, piece in enumerate(tokenizer.vocab) if not printable(piece)]
        model.get_input_embeddings().weight[rows] *= 0.1
        if not config.tie_word_embeddings:
            model.get_output_embeddings().weight[rows] *= 0.1
    return model


def save_folder(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    (folder / "tokenizer.json").write_text(tiny_tokenizer().to_json_str(), encoding="utf-8")
    return folder


def ours(config, state) -> GPT:
    model = GPT(config)
    model.load_state_dict(state)
    return model.float().eval()


def logits_of(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out[0])[0].float().numpy()


IDS = tiny_tokenizer().encode(" ".join(corpus(1)))[:48]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """One family: its transformers model, its folder, what we read from it, our export and its GGUF files."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = hf_model(request.param)
    folder = save_folder(model, tmp / "hf")
    config, state, tokenizer_json, kind = read_model(folder)
    ckpt = save_tiny_checkpoint(tmp / "model.pt", ours(config, state), tiny_tokenizer())
    export = export_hf(ckpt, tmp / "export")
    gguf = {t: convert_to_gguf(export, tmp / f"model-{t}.gguf", t) for t in ("f32", "f16", "bf16", "q8_0")}
    return dict(name=request.param, hf=model, folder=folder, config=config, state=state, kind=kind,
                tokenizer_json=tokenizer_json, export=export, gguf=gguf, tmp=tmp)


def test_imported_logits_equal_transformers(family):
    assert family["kind"] == "hf" and family["tokenizer_json"] == tiny_tokenizer().to_json_str()
    config = family["config"]
    expected_arch = {"gpt2": "gpt2", "smollm2": "llama", "llama3": "llama", "qwen2": "qwen2"}[family["name"]]
    assert config.arch == expected_arch and config.tie_embeddings == (family["name"] != "llama3")
    np.testing.assert_allclose(logits_of(ours(config, family["state"]), IDS), logits_of(family["hf"], IDS),
                               rtol=0, atol=1e-4)


def test_sharded_folder_reads_the_same(family):
    folder = save_folder(family["hf"], family["tmp"] / "sharded", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    config, state, _, _ = read_model(folder)
    assert config == family["config"] and state.keys() == family["state"].keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, family["state"][name]), name


def test_gpt2_as_the_hub_stores_it_reads_the_same(tmp_path):
    """openai-community/gpt2's model.safetensors: names without the `transformer.` prefix, and the causal-mask
    buffers `h.N.attn.bias` of the original checkpoint."""
    from safetensors.torch import load_file, save_file

    folder = save_folder(hf_model("gpt2"), tmp_path / "gpt2")
    stored = load_file(folder / "model.safetensors")
    hub = {name.removeprefix("transformer."): t for name, t in stored.items()}
    hub |= {f"h.{i}.attn.bias": torch.ones(1, 1, 256, 256).tril() for i in range(2)}
    save_file(hub, str(folder / "model.safetensors"), metadata={"format": "pt"})
    state = read_model(folder)[1]
    as_saved = read_model(save_folder(hf_model("gpt2"), tmp_path / "as_saved"))[1]  # the same seed: the same weights
    assert state.keys() == as_saved.keys() and all(torch.equal(state[n], t) for n, t in as_saved.items())


def test_export_loads_in_transformers_with_equal_logits(family):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(family["export"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model) is type(family["hf"])
    np.testing.assert_allclose(logits_of(model.eval(), IDS), logits_of(family["hf"], IDS), rtol=0, atol=1e-4)
    # and we read our own export back to the same config and weights
    config, state, _, _ = read_model(family["export"])
    assert config == family["config"]
    assert all(torch.equal(state[n], t.float()) for n, t in family["state"].items())


def test_gguf_reads_back_equal(family):
    config, state, tokenizer_json, kind = read_model(family["gguf"]["f32"])
    assert kind == "gguf" and config == family["config"]  # rope_scaling and MLP width included
    assert all(torch.equal(state[n], t.float()) for n, t in family["state"].items())
    expected = logits_of(family["hf"], IDS)
    for outtype, tolerance in (("f16", 0.02), ("bf16", 0.05), ("q8_0", 0.1)):
        config_q, state_q, _, _ = read_model(family["gguf"][outtype])
        assert config_q == config, outtype
        if outtype == "bf16":  # kept as stored: half the memory, the values exactly the rounded weights
            weight = state_q["blocks.0.mlp.up.weight" if config.arch != "gpt2" else "blocks.0.mlp.fc.weight"]
            assert weight.dtype == torch.bfloat16
        np.testing.assert_allclose(logits_of(ours(config_q, state_q), IDS), expected, rtol=0,
                                   atol=tolerance * np.abs(expected).max(), err_msg=outtype)


def test_llama_cpp_greedy_text_equals_ours_from_f16(family):
    pytest.importorskip("llama_cpp")
    from tinygpt.export.llama_cpp import run_llama

    tokenizer = tiny_tokenizer()
    config, state, _, _ = read_model(family["gguf"]["f16"])
    prompt_ids = tokenizer.encode(PROMPT)
    text = tokenizer.decode(generate(ours(config, state), prompt_ids, 24, temperature=0.0, eot_id=tokenizer.eot_id))
    assert len(text) > 10 and "\ufffd" not in text  # a real continuation
    assert run_llama(family["gguf"]["f16"], PROMPT, n_predict=24, temperature=0.0, backend="python",
                     threads=1) == text


def test_decoding_a_long_context_model_caches_only_the_positions_it_fills(family, monkeypatch):
    """Imported contexts run to 16k here (128k for Llama 3.2): sampling must not allocate a cache that long."""
    model, sizes = ours(family["config"], family["state"]), []
    new_kv_cache = type(model).new_kv_cache

    def spy(self, *args, **kwargs):
        cache = new_kv_cache(self, *args, **kwargs)
        sizes.append(cache.keys[0].shape[2])
        return cache

    monkeypatch.setattr(type(model), "new_kv_cache", spy)
    with_cache = list(generate(model, IDS[:5], 7, temperature=0.0))
    assert sizes == [12] and family["config"].block_size >= 256
    assert with_cache == list(generate(model, IDS[:5], 7, temperature=0.0, use_cache=False))


def test_q4_k_m_is_byte_identical_to_llama_quantize(family):
    from tinygpt.export.quantize import quantize_gguf

    tool = llama_tool("llama-quantize")
    src, tmp = family["gguf"]["f16"], family["tmp"]
    quantize_gguf(src, tmp / "ours-q4_k_m.gguf", "q4_k_m", threads=1)
    subprocess.run([str(tool), str(src), str(tmp / "llama-q4_k_m.gguf"), "Q4_K_M", "1"], check=True,
                   capture_output=True)
    assert (tmp / "ours-q4_k_m.gguf").read_bytes() == (tmp / "llama-q4_k_m.gguf").read_bytes()


def test_imatrix_quantization_is_byte_identical_to_llama_quantize(family):
    """With our importance matrix of the family's f16 file, the weighted K-quant and legacy paths write what
    `llama-quantize --imatrix` writes (qwen2's biases and llama3's rope_freqs pass through unweighted)."""
    from tinygpt.export.calibrate import main as imatrix_main
    from tinygpt.export.quantize import quantize_gguf

    tool = llama_tool("llama-quantize")
    src, tmp = family["gguf"]["f16"], family["tmp"]
    (tmp / "calibration.txt").write_text(" ".join(corpus(4)), encoding="utf-8")
    imatrix = str(tmp / "imatrix.gguf")  # recorded in the file as given, by both
    imatrix_main(["--gguf", str(src), "--text", str(tmp / "calibration.txt"), "--out", imatrix, "--ctx", "32"])
    for file_type in ("q4_k_m", "q4_0"):
        ours, theirs = tmp / f"ours-imatrix-{file_type}.gguf", tmp / f"llama-imatrix-{file_type}.gguf"
        quantize_gguf(src, ours, file_type, threads=1, imatrix=imatrix)
        subprocess.run([str(tool), "--imatrix", imatrix, str(src), str(theirs), file_type.upper(), "1"], check=True,
                       capture_output=True)
        assert ours.read_bytes() == theirs.read_bytes(), file_type
        plain = tmp / f"ours-plain-{file_type}.gguf"
        quantize_gguf(src, plain, file_type, threads=1)
        weighted = {t.name: bytes(t.data) for t in gguf.GGUFReader(ours).tensors}
        assert any(bytes(t.data) != weighted[t.name] for t in gguf.GGUFReader(plain).tensors), "the matrix was used"


def test_a_llama3_scaling_of_other_settings_reads_back_from_its_rope_freqs(tmp_path):
    """llama.cpp keeps only the divisors (rope_freqs.weight): settings other than Llama 3's own are fitted back."""
    from builders import random_gpt

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    model = random_gpt(tiny_tokenizer(), n_embd=128, arch="llama", rope_theta=500000.0, rope_scaling=scaling,
                       block_size=1024)
    export = export_hf(save_tiny_checkpoint(tmp_path / "m.pt", model, tiny_tokenizer()), tmp_path / "export")
    config, state, _, _ = read_model(convert_to_gguf(export, tmp_path / "m.gguf", "f32"))
    assert config == model.config
    np.testing.assert_allclose(logits_of(ours(config, state), IDS), logits_of(model, IDS), rtol=0, atol=1e-5)


GGUF_PRE = {"gpt2": "gpt-2", "smollm": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}


@pytest.mark.parametrize("name", list(GGUF_PRE))
def test_gguf_with_a_family_vocabulary_encodes_like_hf_tokenizers(tmp_path, name):
    """A GGUF file whose tokenizer metadata is a family's own (its id order, its pre-tokenizer name, control
    and user-defined tokens, Llama 3's BOS), written as llama.cpp's converter writes it: our reader's tokenizer
    gives the ids Hugging Face's `tokenizers` gives."""
    import gguf
    from test_hf_tokenizers import EOT_OF, HELD_OUT, TRAINING_TEXT, build, hf_ids

    from tinygpt.weights.gguf_read import gguf_tokenizer, read_gguf

    hf = build(name)
    added = {a["id"]: a for a in json.loads(hf.to_str())["added_tokens"]}
    by_id = {i: t for t, i in hf.get_vocab(with_added_tokens=True).items()}
    merges = json.loads(hf.to_str())["model"]["merges"]
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GGUF_PRE[name])
    writer.add_token_list([by_id[i] for i in range(len(by_id))])
    writer.add_token_types([1 if i not in added else 3 if added[i]["special"] else 4 for i in range(len(by_id))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(hf.token_to_id(EOT_OF[name]))
    if name == "llama3":
        writer.add_bos_token_id(hf.token_to_id("<|begin_of_text|>"))
    writer.add_add_bos_token(name == "llama3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = gguf_tokenizer(read_gguf(tmp_path / "vocab.gguf"))
    assert ours.eot_id == hf.token_to_id(EOT_OF[name]) and ours.gguf_pre == GGUF_PRE[name]
    for text in HELD_OUT + TRAINING_TEXT:
        assert ours.encode(text) == hf_ids(hf, text), text
        assert ours.encode(text, bos=True) == hf_ids(hf, text, bos=True), text


def test_other_architectures_and_sentencepiece_are_refused(tmp_path):
    folder = save_folder(hf_model("smollm2"), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    cases = [
        ({**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
        ({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
        ({**config, "hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ]
    for changed, message in cases:
        (folder / "config.json").write_text(json.dumps(changed))
        with pytest.raises(TinyGPTError, match=message) as error:
            read_model(folder)
        assert "tinygpt reads GPT2LMHeadModel, LlamaForCausalLM" in str(error.value)
    (folder / "config.json").write_text(json.dumps(config))
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:-1000])
    with pytest.raises(TinyGPTError, match="cannot read .*model.safetensors"):
        read_model(folder)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x0a\x00")  # Llama 2 / Mistral / TinyLlama ship this instead
    with pytest.raises(TinyGPTError, match="SentencePiece tokenizer.model"):
        read_model(folder)
    (tmp_path / "x.bin").write_bytes(b"not a model")
    with pytest.raises(TinyGPTError, match="neither a tinygpt checkpoint nor a GGUF file"):
        read_model(tmp_path / "x.bin")


def test_an_embedding_padded_beyond_the_tokenizer_exports_and_converts(tmp_path):
    """Qwen2.5 ships 151,936 embedding rows for 151,665 tokens: the rows past the tokenizer become UNUSED [PAD]
    tokens in the GGUF file (as convert_hf_to_gguf writes them), and the HF export keeps every row."""
    tokenizer = tiny_tokenizer()
    config_class, settings = FAMILIES["qwen2"]
    config = getattr(transformers, config_class)(vocab_size=tokenizer.vocab_size + 6, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    config_ours, state, _, _ = read_model(save_folder(model, tmp_path / "hf"))
    assert config_ours.vocab_size == tokenizer.vocab_size + 6
    ckpt = save_tiny_checkpoint(tmp_path / "model.pt", ours(config_ours, state), tokenizer)
    export = export_hf(ckpt, tmp_path / "export")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    path = convert_to_gguf(export, tmp_path / "model-f32.gguf", "f32")
    reader = gguf.GGUFReader(path)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert len(tokens) == config.vocab_size and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    assert types[tokenizer.vocab_size:] == [5] * 6 and 5 not in types[:tokenizer.vocab_size]  # 5: UNUSED
    config_back, state_back, _, _ = read_model(path)
    assert config_back == config_ours
    np.testing.assert_allclose(logits_of(ours(config_back, state_back), IDS), logits_of(model, IDS), rtol=0,
                               atol=1e-4)

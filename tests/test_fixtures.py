"""Fixtures: deterministic offline build; tiny models load, run and train; tokenizer and data are sane."""

import json

import pytest
import torch

from kt_sft import fixtures as fx


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixtures")
    manifest = fx.build_fixtures(out, log=None)
    return out, manifest


@pytest.fixture(scope="module")
def tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built[0] / "tokenizer")


def _chat(example):
    return [
        {"role": "user", "content": f"{example['instruction']}\n{example['input']}"},
        {"role": "assistant", "content": example["output"]},
    ]


def test_build_is_deterministic_and_skips_when_built(built, tmp_path):
    out, manifest = built
    again = fx.build_fixtures(tmp_path, archs=["qwen3_moe"], log=None)
    assert again["vocab"] == manifest["vocab"]
    for rel in ("tokenizer/tokenizer.json", "data/tiny_tasks_train.json", "data/tiny_tasks_eval.json",
                "models/qwen3_moe/model.safetensors", "models/qwen3_moe/config.json"):
        assert (out / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    stamp = (tmp_path / "models/qwen3_moe/model.safetensors").stat().st_mtime_ns
    fx.build_fixtures(tmp_path, archs=["qwen3_moe"], log=None)
    assert (tmp_path / "models/qwen3_moe/model.safetensors").stat().st_mtime_ns == stamp


def test_unknown_arch_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        fx.build_fixtures(tmp_path, archs=["gpt2"], log=None)


def test_tokenizer_round_trips_and_has_special_tokens(tokenizer):
    assert 1000 <= len(tokenizer) <= 2048
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for text in ("Reverse the order of the words.\ncat dog", "Héllo wörld! 123\t✓ 日本 CAT", ""):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # the special tokens are single ids, never split by BPE
    ids = tokenizer("<|im_start|>user\n<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tokenizer.eos_token_id


def test_chat_template(tokenizer):
    msgs = _chat({"instruction": "Write the words in uppercase.", "input": "cat", "output": "CAT"})
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>user\nWrite the words in uppercase.\ncat<|im_end|>\n"
        "<|im_start|>assistant\nCAT<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_dataset_shape(built, tokenizer):
    data_dir = built[0] / "data"
    info = json.loads((data_dir / "dataset_info.json").read_text())
    assert set(info) == {"kt_tiny_train", "kt_tiny_eval"}
    splits = {}
    for name, attrs in info.items():
        rows = json.loads((data_dir / attrs["file_name"]).read_text())
        assert isinstance(rows, list) and rows
        for row in rows:
            assert set(row) == {"instruction", "input", "output"}
            assert all(isinstance(v, str) and v for v in row.values())
        splits[name] = rows
    assert 1000 <= len(splits["kt_tiny_train"]) <= 2000 and len(splits["kt_tiny_eval"]) >= 100
    train_keys = {(r["instruction"], r["input"]) for r in splits["kt_tiny_train"]}
    assert not train_keys & {(r["instruction"], r["input"]) for r in splits["kt_tiny_eval"]}
    assert len({r["instruction"] for r in splits["kt_tiny_train"]}) == len(fx.TASKS)
    texts = [tokenizer.apply_chat_template(_chat(r), tokenize=False) for r in splits["kt_tiny_train"]]
    assert max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) <= 48


@pytest.mark.parametrize("arch", fx.ARCHS)
def test_experts_on_disk_use_the_per_expert_layout(built, arch):
    config = json.loads((built[0] / "models" / arch / "config.json").read_text())
    shapes = {name: shape for name, shape, _ in fx.iter_safetensors_keys(built[0] / "models" / arch)}
    num_experts = config.get("num_experts") or config.get("n_routed_experts") or config["num_local_experts"]
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    hidden = config["hidden_size"]
    keys = fx.expert_keys(arch, config["num_hidden_layers"], num_experts)
    assert keys
    gate, _up, down = fx.ARCH_NOTES[arch].expert_names
    for key in keys:
        want = (hidden, inter) if f".{down}." in key else (inter, hidden)
        assert shapes[key] == want, key
    assert not [k for k in shapes if "gate_up_proj" in k]  # nothing fused on disk
    note = fx.ARCH_NOTES[arch]
    last = config["num_hidden_layers"] - 1
    assert shapes[f"model.layers.{last}.{note.moe_prefix}.gate.weight"] == (num_experts, hidden)
    if note.first_moe_layer:
        assert f"model.layers.0.mlp.{gate}.weight" in shapes  # dense first layer
    if note.shared_expert_prefix:
        assert f"model.layers.{last}.{note.shared_expert_prefix}.up_proj.weight" in shapes
    if note.router_bias:
        assert shapes[f"model.layers.{last}.{note.router_bias}"] == (num_experts,)


@pytest.mark.parametrize("arch", fx.ARCHS)
def test_model_loads_and_trains_one_step(built, tokenizer, arch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = built[0] / "models" / arch
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer)
    # loading fuses the per-expert tensors: gate_up_proj[e] = [gate; up], down_proj[e] = down
    on_disk, note = load_file(model_dir / "model.safetensors"), fx.ARCH_NOTES[arch]
    last = len(model.model.layers) - 1
    fused = model.model.layers[last].mlp.experts
    prefix = f"model.layers.{last}.{note.moe_prefix}.experts.1"
    gate, up, down = (on_disk[f"{prefix}.{name}.weight"] for name in note.expert_names)
    assert torch.equal(fused.gate_up_proj[1], torch.cat([gate, up])) and torch.equal(fused.down_proj[1], down)
    text = tokenizer.apply_chat_template(_chat(fx.make_examples(4, 0, seed=7)[0][0]), tokenize=False)
    batch = tokenizer([text, "dog cat"], return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(len(tokenizer))).item()) < 1.0
    loss.backward()
    experts = model.model.layers[-1].mlp.experts  # fused in memory: gate_up_proj (E, 2I, H)
    assert experts.gate_up_proj.dim() == 3 and experts.gate_up_proj.grad.abs().sum() > 0
    assert model.model.layers[-1].mlp.gate.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_llamafactory_chatml_template_matches_the_tokenizer(built):
    pytest.importorskip("llamafactory")
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[0] / "tokenizer")
    template = get_template_and_fix_tokenizer(tok, DataArguments(template=fx.LLAMAFACTORY_TEMPLATE))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    msgs = _chat({"instruction": "Spell out the digits.", "input": "4 2", "output": "four two"})
    prompt_ids, response_ids = template.encode_oneturn(tok, msgs)
    reference = AutoTokenizer.from_pretrained(built[0] / "tokenizer")
    ids = reference.apply_chat_template(msgs, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert prompt_ids + response_ids == list(ids)  # the same tokens it trains on and we chat with
    assert tok.decode(response_ids) == "four two<|im_end|>\n"


def test_llamafactory_reads_the_dataset_info(built):
    pytest.importorskip("llamafactory")
    from llamafactory.data.parser import get_dataset_list

    attrs = get_dataset_list(["kt_tiny_train", "kt_tiny_eval"], str(built[0] / "data"))
    assert [a.formatting for a in attrs] == ["alpaca", "alpaca"]
    assert [a.load_from for a in attrs] == ["file", "file"]

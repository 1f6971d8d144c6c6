"""Ask a fine-tuned kt_sft model a few held-out questions: the converted model (experts from the pack)
plus the LoRA adapter LLaMA-Factory saved, through transformers' generate and the chat template.

    .venv/bin/python scripts/chat_demo.py --model runs/kt/qwen3_moe-int8 --adapter runs/tiny_qwen3_moe_kt \
        [--data runs/fixtures/data/tiny_tasks_eval.json] [-n 6]
"""

import argparse
import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="kt-sft convert output directory")
    p.add_argument("--adapter", required=True, help="LLaMA-Factory output_dir holding adapter_model.safetensors")
    p.add_argument("--data", default="runs/fixtures/data/tiny_tasks_eval.json", help="alpaca-format questions")
    p.add_argument("-n", type=int, default=6, help="how many questions")
    a = p.parse_args()

    tok = AutoTokenizer.from_pretrained(a.adapter)
    base = AutoModelForCausalLM.from_pretrained(a.model, trust_remote_code=True, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    examples = json.load(open(a.data))[: a.n]
    right = 0
    for ex in examples:
        prompt = ex["instruction"] + ("\n" + ex["input"] if ex.get("input") else "")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=32, do_sample=False)
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        right += answer == ex["output"].strip()
        print(f"Q: {prompt!r}\n   model: {answer!r}\n   want:  {ex['output']!r}")
    print(f"exact answers: {right}/{len(examples)}")


if __name__ == "__main__":
    main()

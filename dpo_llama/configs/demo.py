"""Where the embedded demo's inputs live and where its stages write, used as the scripts' defaults.

With no arguments, every stage script runs on the demo: a tiny pretrained LLaMA and arithmetic dialogues
shipped in ``dpo_llama/assets/demo`` (regenerate them with ``python scripts/make_demo_assets.py``). Outputs go
under the current working directory (``./datasets``, ``./checkpoints``, ``./logs``).
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "demo"
BASE_MODEL = ASSETS / "base"
TOKENIZER = BASE_MODEL / "tokenizer.model"
TEMPLATE = "llama2"
SFT_DATA = ASSETS / "sft.jsonl"
PREFERENCE_DATA = ASSETS / "preference_train.jsonl"
PREFERENCE_TEST_DATA = ASSETS / "preference_test.jsonl"
EVAL_DATA = ASSETS / "eval.jsonl"

SFT_DATASET = "./datasets/demo/sft"
SFT_CKPT = "./checkpoints/demo/sft-lora"
SFT_MERGED = "./checkpoints/demo/sft-merged"
PREFERENCE_DATASET = "./datasets/demo/preference"
DPO_CKPT = "./checkpoints/demo/dpo-lora"
DPO_MERGED = "./checkpoints/demo/dpo-merged"
LOG_DIR = "./logs"

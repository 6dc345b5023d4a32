"""Make a ChibiT-style language model locally (no download): a small GPT-2 pretrained on a text file.

    python lm_cotraining/pretrain_chibit.py --text data/wiki.train.raw --out checkpoints/ChibiT

Trains a byte-level BPE tokenizer on the text unless --tokenizer names one, then a GPT-2 (default 3 layers,
hidden 128, 1 head) with the causal-LM loss, and saves model and tokenizer with save_pretrained. Use the folder with
--pretrained_lm (experiment.py or lm_cotraining/experiment.py). The sizes, --steps and --batch_size must be >= 1 and
--lr a finite number > 0; they are checked before the corpus is read. Bytes of the corpus that are not UTF-8 are read
as U+FFFD.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.cli import THREADS_HELP, HelpFormatter  # noqa: E402
from decision_transformer.errors import cli_entry  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--text", required=True, help="text file, or folder of .txt/.raw/.tokens files")
    p.add_argument("--out", default="checkpoints/ChibiT",
                   help="output folder (save_pretrained); not the working folder or one holding it or the corpus")
    p.add_argument("--tokenizer", default=None, help="existing tokenizer folder; default: train a byte-level BPE")
    p.add_argument("--vocab_size", type=int, default=8192, help="BPE vocabulary size when training a tokenizer")
    p.add_argument("--n_layer", type=int, default=3)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--n_head", type=int, default=1)
    p.add_argument("--n_positions", type=int, default=1024,
                   help="position table rows (>= 1000 avoids tiling with --extend_positions)")
    p.add_argument("--block_size", type=int, default=256, help="training sequence length")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", default="auto", help=THREADS_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (once the new model is completely written)")
    return p


@cli_entry
def main(argv=None):
    args = parser().parse_args(argv)
    from decision_transformer.run import resolve_device
    from decision_transformer.training.lm_pretrain import pretrain_chibit

    device = str(resolve_device(args.device, args.threads))
    return pretrain_chibit(args.text, args.out, tokenizer_dir=args.tokenizer, vocab_size=args.vocab_size,
                    n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_positions=args.n_positions,
                    block_size=args.block_size, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                    warmup_steps=args.warmup_steps, seed=args.seed, device=device,
                    overwrite=args.overwrite)


if __name__ == "__main__":
    main()

"""Train a bottlenecked ViT with Hugging Face Accelerate.

    accelerate launch examples/train.py --model vit_tiny_vib_b1 --data digits \
        --model-kwargs depth=2 img_size=32 patch_size=4 --epochs 20 --batch-size 64 --output runs/b1

Runs as it is on one CPU, one GPU, several GPUs (``accelerate launch --multi_gpu``), several nodes,
or two local CPU processes (``torchrun --nproc_per_node 2 examples/train.py ...``). The loop is
``timm_vib.training.train``, read top to bottom: the same function serves ``timm-vib train``, so the
console command and this script cannot drift apart. Arguments: ``python examples/train.py --help``.
"""
from timm_vib.training import parse_args, train


def main():
    args = parse_args()
    # 1. checks (model name, batch size, data, class list) raise before anything starts
    # 2. Accelerator (device, processes, mixed precision, seedable sampler), data, model, AdamW + cosine
    # 3. resume from OUTPUT/checkpoints with --resume; skip the batches already seen
    # 4. per epoch: train (CE + beta * information), validate in eval mode, log metrics.jsonl, checkpoint
    # 5. final weights (model.safetensors + config.json) and summary.json
    run_dir = train(args)
    print(f'run folder: {run_dir}')


if __name__ == '__main__':
    main()

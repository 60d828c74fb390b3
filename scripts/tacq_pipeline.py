"""TaCQ's gradient pass over several GPUs: the blocks split into contiguous stages, one stage per
process (pipeline parallelism with torch.distributed send/recv). It is mixq.gradient_magnitudes
with the model cut in pieces: for each sample, the forward runs stage by stage (each stage keeps
its blocks' inputs and sends its output on), the last stage applies the fp32 head and sends
dL/dh back, and each stage recomputes its blocks in fp32 (mixq.block_gradients), adds |dL/dW|
into the accumulators of its own blocks and sends dL/d(its input) down. Each GPU holds 1/n of
the weights and of the fp32 accumulators (what does not fit on one GPU at 70B: 280 GB of them);
the stages take turns, so the speed is about one GPU's (this buys memory, not time). Each
process reads only its stage's tensors from the checkpoint (an HF directory).

    torchrun --nproc-per-node 8 scripts/tacq_pipeline.py --ckpt DIR --out grads/ \
        [--calib pydoc] [--nsamples 128] [--seqlen 2048]

Each rank writes grads/grads-{rank}.safetensors (its blocks' sums of |dL/dW|, fp32); give their
union to mixq.tacq_scores(..., G=G) for the rest of TaCQ. Without GPUs it runs on the CPU with
the gloo backend (how the tests check it against mixq.gradient_magnitudes).
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mixq  # noqa: E402
import model as llama  # noqa: E402


def stage_blocks(n_layers: int, rank: int, world: int) -> range:
    """The contiguous blocks of stage `rank`: [rank L / n, (rank + 1) L / n)."""
    return range(rank * n_layers // world, (rank + 1) * n_layers // world)


def stage_tensors(args: llama.ModelArgs, rank: int, world: int):
    """name -> whether stage `rank` needs that tensor: its blocks, the embeddings on the first
    stage, the final norm and lm_head on the last (for model.load's `only`)."""
    blocks = stage_blocks(args.n_layers, rank, world)

    def needed(name: str) -> bool:
        if name.startswith("layers."):
            return int(name.split(".")[1]) in blocks
        if name == "embed_tokens.weight":
            return rank == 0 or (rank == world - 1 and args.tie_embeddings)
        return rank == world - 1  # norm.weight, lm_head.weight
    return needed


def pipeline_gradient_magnitudes(model: llama.Transformer, calib, answers=None, device="cpu",
                                 log=print) -> dict:
    """This rank's part of mixq.gradient_magnitudes: G for the linears of its blocks. Call in
    every process of an initialised process group, with the same model and calibration data."""
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks = stage_blocks(len(model.layers), rank, world)
    first, last = rank == 0, rank == world - 1
    for li in blocks:  # only this stage's blocks go to its device
        model.layers[li].to(device)
    G = {name: torch.zeros(model.get_submodule(name).weight.shape, device=device)
         for name in mixq.linear_names(model) if int(name.split(".")[1]) in blocks}
    head = mixq.fp32_head(model).to(device) if last else None
    dim, dtype = model.args.dim, model.embed_tokens.weight.dtype
    for i, tokens in enumerate(calib):
        T = len(tokens)
        tokens = tokens.to(device)
        cos, sin = (t.to(device) for t in model.rope(0, T))
        with torch.no_grad():  # forward through this stage, keeping each block's input
            if first:
                h = model.embed_tokens(tokens[None].to(model.device)).to(device)
            else:
                h = torch.empty(1, T, dim, dtype=dtype, device=device)
                dist.recv(h, rank - 1)
            inputs = []
            for li in blocks:
                inputs.append(h)
                h = model.layers[li](h, cos, sin)
            if not last:
                dist.send(h.contiguous(), rank + 1)
        if last:  # dL/dh at the top
            dh = mixq.head_gradient(head, h, tokens, None if answers is None else answers[i])
        else:
            dh = torch.empty(1, T, dim, dtype=torch.float32, device=device)
            dist.recv(dh, rank + 1)
        for li in reversed(blocks):  # this stage's blocks, backwards
            dh = mixq.block_gradients(model.layers[li], inputs.pop(), cos, sin, dh, G, li)
        if not first:
            dist.send(dh.contiguous(), rank - 1)
        if rank == 0 and (i + 1) % max(1, len(calib) // 4) == 0:
            log(f"  gradients: {i + 1}/{len(calib)} samples")
    return G


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a checkpoint (default: the embedded model)")
    p.add_argument("--out", required=True, help="directory for grads-{rank}.safetensors")
    p.add_argument("--calib", default="pydoc")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=list(llama.DTYPES))
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    # only this stage's tensors are read (on the host; each stage moves its blocks to its GPU)
    args = llama.ModelArgs.from_hf(llama.read_config(llama.resolve_ckpt(a.ckpt)))
    only = stage_tensors(args, rank, dist.get_world_size())
    model, tok = llama.load(a.ckpt, a.dtype, "cpu", only=only)
    calib, answers = mixq.calibration_data(a.calib, tok, a.nsamples, a.seqlen, a.seed)
    G = pipeline_gradient_magnitudes(model, calib, answers, device)
    from safetensors.torch import save_file
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".grads-{rank}.tmp"
    save_file({k: v.cpu().contiguous() for k, v in G.items()}, str(tmp))
    os.replace(tmp, out / f"grads-{rank}.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

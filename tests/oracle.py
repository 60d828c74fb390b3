"""transformers, the oracle, in a process of its own.

Why a second process: transformers (5.24 and later) imports Hugging Face's `kernels` package as
soon as a model class loads, and in a process whose sys.path starts at the project root,
`import kernels` finds mixq's kernels.py instead. So the tests never import transformers
themselves. They start this file as a script (its sys.path starts at tests/, PYTHONPATH removed)
and ask it for what they compare against: random tiny checkpoints, logits, losses, tokens.

Protocol: one JSON request per line on the server's stdin, one JSON answer per line on its
stdout. Tensors travel through safetensors files in a temporary directory.

    oracle = Oracle()
    oracle.save_tiny(path, seed=0, num_hidden_layers=3)     # a random Llama, saved by transformers
    out = oracle.forward(path, ids)                         # {"logits", "loss", "inv_freq"}
    oracle.tokenize(gguf_path, ["some text"])               # [[ids]]
    oracle.chat(tokenizer_dir, [{"role": "user", ...}])     # the chat prompt text
    oracle.compress(src, out, bits=4, group_size=32, symmetric=False)  # compressed-tensors'
    oracle.gptq_forward(ckpt, ids, loader="gptqmodel")      # fp16 logits through GPTQModel
    oracle.gptqmodel_quantize(src, out, texts, bits=4, group_size=128, sym=False)
"""

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]  # the project root: never on the server's sys.path

# a small GQA Llama: 4 query heads, 2 KV heads, 2 layers
TINY_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                   bos_token_id=1, eos_token_id=2)


# ---------------------------------------------------------------------------------------------
# the client: used by the tests, imports no transformers

class Oracle:
    """A transformers server process, started on first use and stopped at exit."""

    def __init__(self):
        self.proc = None
        self.tmp = Path(tempfile.mkdtemp(prefix="mixq-oracle-"))
        self.calls = 0
        atexit.register(self.close)

    def start(self):
        if importlib.util.find_spec("transformers") is None:
            import pytest
            pytest.skip("transformers (the oracle) is not installed")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["TRANSFORMERS_VERBOSITY"] = "error"
        env.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 2)))
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], cwd=self.tmp, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, op, **request):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the transformers oracle exited (code {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the transformers oracle failed on {op}:\n{answer['error']}")
        return answer

    def tensor_file(self):
        self.calls += 1
        return self.tmp / f"t{self.calls}.safetensors"

    def save_tiny(self, path, seed=0, **config):
        """transformers.LlamaForCausalLM(TINY_CONFIG | config), random weights from `seed` and
        random norm gains in [0.5, 1.5], saved with save_pretrained(path)."""
        self.ask("save_tiny", path=str(path), seed=seed, config={**TINY_CONFIG, **config})
        return Path(path)

    def forward(self, ckpt, ids, gguf_file=None, dtype="float32", dequantize=False):
        """transformers' forward pass of a checkpoint (a directory, or a GGUF file in it) on
        ids (B, T): logits (B, T, V), the next-token loss of each row (B,), RoPE's inv_freq.
        dequantize: a compressed-tensors checkpoint loaded with CompressedTensorsConfig(
        dequantize=True) (dense weights, decompressed by compressed-tensors on load)."""
        src, out = self.tensor_file(), self.tensor_file()
        save_file({"ids": ids.contiguous()}, src)
        self.ask("forward", ckpt=str(ckpt), gguf_file=gguf_file, dtype=dtype, ids=str(src),
                 out=str(out), dequantize=dequantize)
        return load_file(out)

    def tokenize(self, gguf_path, texts):
        """transformers' GGUF tokenizer: the ids of each text, without special tokens."""
        return self.ask("tokenize", gguf=str(gguf_path), texts=list(texts))["ids"]

    def chat(self, tokenizer_dir, messages, **options):
        """transformers' AutoTokenizer(tokenizer_dir).apply_chat_template(messages, tokenize=False,
        add_generation_prompt=True, **options): the prompt text."""
        return self.ask("chat", tokenizer_dir=str(tokenizer_dir), messages=messages,
                        options=options)["text"]

    def compress(self, src, out, bits, group_size, symmetric):
        """compressed-tensors' own pack-quantized compressor on the checkpoint src (fp32), every
        linear but lm_head, saved to out: a min-max grid per row and group from its
        calculate_qparams (scales rounded to fp16 values, which mixq holds them in), codes and
        packing by its ModelCompressor. group_size -1: the channel strategy."""
        self.ask("compress", src=str(src), out=str(out), bits=bits, group_size=group_size,
                 symmetric=symmetric)
        return Path(out)

    def gptq_forward(self, ckpt, ids, loader):
        """The fp16 logits (B, T, V) of a GPTQ checkpoint on ids through GPTQModel's torch
        kernel (its CPU kernels take fp16 and bf16 only): loader "gptqmodel" is GPTQModel.load,
        "transformers" AutoModelForCausalLM with GPTQConfig(backend="torch")."""
        src, out = self.tensor_file(), self.tensor_file()
        save_file({"ids": ids.contiguous()}, src)
        self.ask("gptq_forward", ckpt=str(ckpt), ids=str(src), out=str(out), loader=loader)
        return load_file(out)["logits"]

    def gptqmodel_quantize(self, src, out, texts, bits, group_size, sym):
        """GPTQModel's own GPTQ of the HF checkpoint src, calibrated on texts, saved to out."""
        self.ask("gptqmodel_quantize", src=str(src), out=str(out), texts=list(texts), bits=bits,
                 group_size=group_size, sym=sym)
        return Path(out)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the server: this file run as a script, transformers imported here only

def serve():
    import transformers  # the only process of the test suite that imports it
    transformers.utils.logging.disable_progress_bar()
    transformers.LlamaForCausalLM  # loads the model classes, and with them `kernels`
    kernels = sys.modules.get("kernels")
    assert kernels is None or Path(kernels.__file__).resolve().parent != ROOT, kernels.__file__
    models, tokenizers = {}, {}

    def load(ckpt, gguf_file, dtype, dequantize=False):
        key = (ckpt, gguf_file, dtype, dequantize)
        extra = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} \
            if dequantize else {}
        if key not in models or gguf_file is None:  # a directory may be rewritten between calls
            models[key] = transformers.AutoModelForCausalLM.from_pretrained(
                ckpt, gguf_file=gguf_file, dtype=getattr(torch, dtype), **extra).eval()
        return models[key]

    def save_tiny(path, seed, config):
        torch.manual_seed(seed)
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
        with torch.no_grad():  # random norms: a mixed-up or missing norm shows in the logits
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
        m.save_pretrained(path)
        return {}

    @torch.no_grad()
    def forward(ckpt, gguf_file, dtype, ids, out, dequantize=False):
        m = load(ckpt, gguf_file, dtype, dequantize)
        ids = load_file(ids)["ids"]
        logits = m(ids).logits
        loss = torch.stack([m(row[None], labels=row[None]).loss for row in ids])
        save_file({"logits": logits.contiguous(), "loss": loss,
                   "inv_freq": m.model.rotary_emb.inv_freq.float().contiguous()}, out)
        return {}

    def tokenize(gguf, texts):
        if gguf not in tokenizers:
            p = Path(gguf)
            tokenizers[gguf] = transformers.AutoTokenizer.from_pretrained(str(p.parent),
                                                                          gguf_file=p.name)
        tok = tokenizers[gguf]
        return {"ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts]}

    def chat(tokenizer_dir, messages, options):
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        return {"text": tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True, **options)}

    @torch.no_grad()
    def compress(src, out, bits, group_size, symmetric):
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                     QuantizationScheme, apply_quantization_config)
        from compressed_tensors.quantization.utils import calculate_qparams
        m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="channel" if group_size == -1 else "group",
                                group_size=None if group_size == -1 else group_size)
        apply_quantization_config(m, QuantizationConfig(config_groups={"group_0": (
            QuantizationScheme(targets=["Linear"], weights=args))}, ignore=["lm_head"]))
        for mod in m.modules():
            if hasattr(mod, "weight_scale"):
                N, K = mod.weight.shape
                W = mod.weight.reshape(N, -1, K if group_size == -1 else group_size)
                scale, zp = calculate_qparams(W.amin(-1), W.amax(-1), args)
                mod.weight_scale.copy_(scale.half().float().reshape(mod.weight_scale.shape))
                mod.weight_zero_point.copy_(zp.reshape(mod.weight_zero_point.shape))
        compressor = ModelCompressor.from_pretrained_model(m, quantization_format="pack-quantized")
        compressor.compress_model(m)
        m.save_pretrained(out)
        compressor.update_config(out)
        return {}

    @torch.no_grad()
    def gptq_forward(ckpt, ids, out, loader):
        from gptqmodel import BACKEND, GPTQModel
        if loader == "gptqmodel":
            m = GPTQModel.load(ckpt, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
        else:
            m = transformers.AutoModelForCausalLM.from_pretrained(
                ckpt, dtype=torch.float16, device_map="cpu",
                quantization_config=transformers.GPTQConfig(bits=4, backend="torch"))
        save_file({"logits": m.eval()(load_file(ids)["ids"]).logits.float().contiguous()}, out)
        return {}

    def gptqmodel_quantize(src, out, texts, bits, group_size, sym):
        from gptqmodel import GPTQModel, QuantizeConfig
        m = GPTQModel.load(src, QuantizeConfig(bits=bits, group_size=group_size, sym=sym),
                           device="cpu")
        m.quantize(texts, batch_size=1)
        m.save(out)
        return {}

    ops = {"save_tiny": save_tiny, "forward": forward, "tokenize": tokenize, "chat": chat,
           "compress": compress, "gptq_forward": gptq_forward,
           "gptqmodel_quantize": gptqmodel_quantize}
    answers = os.fdopen(os.dup(1), "w")  # answers go here; anything printed goes to stderr
    os.dup2(2, 1)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = ops[request.pop("op")](**request)
        except Exception:
            answer = {"error": traceback.format_exc()}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    assert sys.argv[1:] == ["--serve"], "run by tests/oracle.py's Oracle, not by hand"
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    serve()

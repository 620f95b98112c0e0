"""llmkit's CPU decoding kernels (cpu_kernels.cpp) against products worked out with PyTorch on the untiled weights:
the tile layouts round-trip; the bfloat16 and float32 kernels equal x @ W^T in float32; the int8 and int4 kernels
equal the product of the hand-quantized activations (one int8 scale per 4 inputs) with the dequantized weights; the
engine's decoding layout tiles bfloat16 and float32 layers, decodes as a full forward loop does and keeps the
model's parameter count for reports; the compiled step runs the kernels and chooses the eager tokens. The product
tests run each kernel's AVX2 version and, where the CPU has AVX-512 with VNNI, its AVX-512 version (4 rows at a
time: the row counts leave last chunks of 1, 2 and 3 rows; one row of bfloat16, float32 or int8 runs the AVX2
version on every CPU). The kernels need an x86-64 CPU with AVX2 and a C++ compiler: elsewhere those tests skip, and
the layout tests still run."""

from pathlib import Path

import pytest
import torch
from helpers import char_tokenizer, naive_greedy, reference_activations, tiny_config
from torch import nn
from torch.nn import functional as F

from llmkit.infer import Engine, GenerationConfig, cpu_kernels
from llmkit.infer import runner as runner_module
from llmkit.infer.cpu_kernels import TiledLinear
from llmkit.infer.engine import use_decoding_layout
from llmkit.infer.quantize import Int4Linear, Int8Linear
from llmkit.model import Transformer

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="llmkit's CPU kernels need an x86-64 CPU with AVX2 and a C++ compiler"
)


@pytest.fixture(params=[256, 512])
def vector_bits(request):
    """Each kernel version in turn; the width this CPU runs by default is restored afterwards."""
    default = cpu_kernels.vector_bits()
    if cpu_kernels.use_vector_bits(request.param) != request.param:
        cpu_kernels.use_vector_bits(default)
        pytest.skip("this CPU has no AVX-512 with VNNI")
    yield request.param
    cpu_kernels.use_vector_bits(default)


def untile_int4(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of cpu_kernels.tile_int4 in PyTorch: codes (out, in) as uint8."""
    packed = cpu_kernels.untile(tiles)
    out = packed.shape[0]
    halves = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(out, -1, cpu_kernels.GROUP // 2, 2)
    return halves.transpose(-1, -2).reshape(out, -1)


def untile_groups(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of cpu_kernels.tile_groups: (out, in / 32)."""
    blocks, groups, rows = tiles.shape
    return tiles.transpose(1, 2).reshape(blocks * rows, groups)


def test_tile_layouts_round_trip_and_keep_8_rows_together():
    weight = torch.arange(16 * 64).view(16, 64)
    tiles = cpu_kernels.tile(weight, 32)
    assert tiles.shape == (2, 2, 8, 32)
    assert torch.equal(tiles[1, 0, 3], weight[8 + 3, :32])  # tile 1 holds rows 8..15; block 0 their first 32 inputs
    assert torch.equal(cpu_kernels.untile(tiles), weight)
    codes = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    packed = cpu_kernels.tile_int4(codes)
    assert packed.shape == (2, 2, 8, 16)
    # byte j of a row's group: code j in the low nibble, code j + 16 in the high one
    assert int(packed[0, 1, 2, 5]) == int(codes[2, 32 + 5]) | int(codes[2, 32 + 21]) << 4
    assert torch.equal(untile_int4(packed), codes)
    scales = torch.randn(16, 2)
    tiled = cpu_kernels.tile_groups(scales)
    assert tiled.dtype == torch.float16 and tiled.shape == (2, 2, 8)  # Q4_1's precision
    assert torch.equal(untile_groups(tiled), scales.half())


@needs_kernels
def test_the_vector_width_is_chosen_from_the_cpu_and_can_be_set_to_avx2():
    default = cpu_kernels.vector_bits()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # the kernel's own flags: the AVX-512 versions need these five
        flags = set(cpuinfo.read_text().split())
        wide = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags
        assert default == (512 if wide else 256)
        assert cpu_kernels.bf16_pair_products() == (wide and "avx512_bf16" in flags)
    assert cpu_kernels.use_vector_bits(256) == 256 and cpu_kernels.vector_bits() == 256
    assert not cpu_kernels.bf16_pair_products()  # an AVX-512 instruction: not on the AVX2 path
    cpu_kernels.use_vector_bits(default)
    with pytest.raises(RuntimeError, match="256 or 512"):
        cpu_kernels.use_vector_bits(128)


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "f32"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
def test_bfloat16_and_float32_kernels_equal_the_float32_product(rows, kind, vector_bits):
    torch.manual_seed(0)
    weight, x = torch.randn(24, 40), torch.randn(rows, 40)
    weight = weight.bfloat16() if kind == "bf16" else weight
    got = cpu_kernels.gemv(kind, x, cpu_kernels.tile(weight, 8), out_features=24)
    torch.testing.assert_close(got, x @ weight.float().T, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 11, 16, 61])
def test_bfloat16_kernel_with_bfloat16_activations_equals_the_exact_product(rows, vector_bits):
    """bfloat16 activations (a bfloat16 model's) take AVX-512 BF16's pair products where the CPU has them (more than 4
    rows, up to 8 a pass, up to BF16_DOT_MAX_ROWS rows), else they are widened: the products are exact, only the
    float32 sums' order differs, and the result is float32. Weights near 1e-3 and 1e2 and activations across the same
    range."""
    torch.manual_seed(0)
    weight = (torch.randn(24, 96) * torch.logspace(-3, 2, 96)).bfloat16()
    x = (torch.randn(rows, 96) * torch.logspace(2, -3, 96)).bfloat16()
    got = torch.ops.llmkit_cpu.gemv_bf16(x, cpu_kernels.tile(weight, 8), 24)
    expected = x.double() @ weight.double().T
    assert got.dtype == torch.float32 and ((got.double() - expected).abs().max() / expected.abs().max()) < 1e-6


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 7, 16])
def test_int8_kernel_equals_quantized_activations_times_the_weights(rows, vector_bits):
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (16, 96), dtype=torch.int8)
    scales = torch.rand(16) / 100
    x = torch.randn(rows, 96)
    x[:, 7] = 90.0  # an outlier channel: only its 3 neighbours share its scale
    x[:, 12:16] = 0.0  # a span of zeros: scale 0, codes 0
    got = cpu_kernels.gemv("int8", x, cpu_kernels.tile(codes, 32), scales, out_features=16)
    expected = reference_activations(x) @ (codes.float() * scales[:, None]).T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - x @ (codes.float() * scales[:, None]).T).abs().max() < 0.01 * expected.abs().max()


def int4_tiles(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An int4 layer's buffers for the kernels: codes (out, in) in 0..15, group scales and minimums (out, in / 32)."""
    return cpu_kernels.tile_int4(codes), cpu_kernels.tile_groups(scales), cpu_kernels.tile_groups(minimums)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 7, 9, 16])  # AVX2: 1 row unpacks the codes in registers, more once per tile
def test_int4_kernel_equals_codes_times_scales_plus_minimums(rows, vector_bits):
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    # stored in float16: values it holds exactly, so the product below is the kernel's arithmetic
    scales, minimums = torch.rand(24, 2).half().float(), -torch.rand(24, 2).half().float()
    x = torch.randn(rows, 64)
    got = cpu_kernels.gemv("int4", x, *int4_tiles(codes, scales, minimums), out_features=24)
    # per group: scale · (codes · quantized x) + minimum · (the plain sum of x)
    quantized = reference_activations(x).view(rows, 2, 32)
    by_codes = torch.einsum("rgi,ogi->rog", quantized, codes.float().view(24, 2, 32))
    expected = (by_codes * scales).sum(-1) + x.view(rows, 2, 32).sum(-1) @ minimums.T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_untiled_16_bit_and_float32_tiles_are_the_weight_again(dtype):
    weight = torch.randn(24, 96).to(dtype)
    got = cpu_kernels.untiled(cpu_kernels.tile(weight, 8), out_features=24)
    assert got.is_contiguous() and torch.equal(got, weight)
    result = torch.library.opcheck(torch.ops.llmkit_cpu.untile_dense.default, (cpu_kernels.tile(weight, 8), 24))
    assert all(outcome == "SUCCESS" for outcome in result.values())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_tiles_equal_pytorchs_product_to_the_bit(dtype):
    """What prompts multiply by: codes times scales (plus minimums for int4) worked out with PyTorch on the untiled
    codes, then rounded to the dtype."""
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (24, 96), dtype=torch.int8)
    scales = torch.rand(24) * torch.logspace(-6, 2, 24)
    got = cpu_kernels.dequantize("int8", cpu_kernels.tile(codes, 32), scales, out_features=24, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, (codes.float() * scales[:, None]).to(dtype))
    codes = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    group_scales = (torch.rand(16, 2) * torch.logspace(-4, 1, 16)[:, None]).half()
    minimums = (-torch.rand(16, 2) * 3).half()
    int4_args = int4_tiles(codes, group_scales, minimums)
    got = cpu_kernels.dequantize("int4", *int4_args, out_features=16, dtype=dtype)
    by_group = codes.float().view(16, 2, 32) * group_scales.float()[..., None] + minimums.float()[..., None]
    assert got.dtype == dtype and torch.equal(got, by_group.view(16, 64).to(dtype))
    # the shapes torch.compile traces them with (a batch of more than 16 rows in a compiled step) are the real ones
    for op, args in [
        (torch.ops.llmkit_cpu.dequantize_int8, (cpu_kernels.tile(codes.to(torch.int8), 32), scales[:16], 16, dtype)),
        (torch.ops.llmkit_cpu.dequantize_int4, (*int4_args, 16, dtype)),
    ]:
        assert all(result == "SUCCESS" for result in torch.library.opcheck(op.default, args).values())


def reference_attention(q, keys, values, mask):
    """PyTorch's attention in float32 with every query head as a head of its own (keys and values repeated)."""
    batch, heads, group, dim = q.shape
    queries = q.float().reshape(batch, heads * group, 1, dim)
    keys, values = (t.float().repeat_interleave(group, dim=1) for t in (keys, values))
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
    return out.reshape(batch, heads, group, dim)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group, dim, span", [(1, 8, 1), (3, 64, 13), (2, 72, 40), (4, 16, 64)])
def test_decode_attention_equals_scaled_dot_product_attention(dtype, group, dim, span):
    """Views on a larger cache (as the model passes them), spans that end inside a block of 8 positions, head sizes
    of one, eight and nine vectors; per-row masks with holes, and no mask."""
    torch.manual_seed(0)
    batch, heads, capacity = 3, 2, span + 5
    q = torch.randn(batch, heads, group, dim).to(dtype)
    cache_keys, cache_values = (torch.randn(batch, heads, capacity, dim).to(dtype) for _ in range(2))
    keys, values = cache_keys[:, :, :span], cache_values[:, :, :span]
    allowed = torch.rand(batch, 1, 1, span) < 0.7
    allowed[..., 0] = True  # every row attends somewhere
    allowed[1, ..., max(1, span // 2) :] = False  # a row that ends early, as a shorter sequence in a batch
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for mask in (allowed, None):
        got = cpu_kernels.decode_attention(q, keys, values, mask)
        assert got.dtype == dtype and got.shape == q.shape
        expected = reference_attention(q, keys, values, mask)
        torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


@needs_kernels
def test_decode_attention_gives_zeros_where_nothing_may_be_attended_and_checks_its_inputs():
    q, keys = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 5, 8)
    mask = torch.tensor([True, False]).view(2, 1, 1, 1).expand(2, 1, 1, 5)
    got = cpu_kernels.decode_attention(q, keys, keys, mask)
    assert torch.equal(got[1], torch.zeros(1, 2, 8))
    torch.testing.assert_close(got[:1], reference_attention(q[:1], keys[:1], keys[:1], None))
    with pytest.raises(RuntimeError, match="multiple of 8|dim % 8"):
        cpu_kernels.decode_attention(torch.randn(1, 1, 1, 12), torch.randn(1, 1, 5, 12), torch.randn(1, 1, 5, 12), None)
    with pytest.raises(RuntimeError, match="boolean"):
        cpu_kernels.decode_attention(q, keys, keys, mask.float())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_kernels.decode_attention(q.double(), keys.double(), keys.double(), None)


@needs_kernels
def test_the_engine_attends_with_the_kernel_and_decodes_the_tokens_of_pytorchs_attention(tmp_path):
    """Grouped-query attention, several requests of different lengths (per-row masks): the same greedy tokens with
    the kernel as with scaled_dot_product_attention, and a model being trained skips it."""
    tokenizer = char_tokenizer(tmp_path)
    changes = dict(vocab_size=tokenizer.vocab_size, n_embd=48, n_head=6, n_kv_head=2, context_length=48)
    torch.manual_seed(0)
    model = Transformer(tiny_config(**changes)).eval()
    engine = Engine(model, tokenizer)
    attention = model.blocks[0].attention
    assert attention.decode_attention is cpu_kernels.decode_attention
    prompts = [tokenizer.encode(text) for text in ("hello", "abc def ghi", "xyz")]
    config = GenerationConfig(max_new_tokens=12, temperature=0, stop_at_end_of_text=False)
    with_kernel = [c.token_ids for c in engine.generate_ids(prompts, config)]
    for block in model.blocks:
        block.attention.decode_attention = None
    assert with_kernel == [c.token_ids for c in engine.generate_ids(prompts, config)]
    calls = []
    attention.decode_attention = lambda *args: calls.append(args) or cpu_kernels.decode_attention(*args)
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.tensor([prompts[0]]), cache=cache)
        model.train()
        model(torch.tensor([[1]]), cache=cache)
        assert not calls  # training (dropout) keeps PyTorch's attention
        model.eval()
        model(torch.tensor([[1]]), cache=cache)
    assert len(calls) == 1


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", ["one", "the kernel's most", "more: PyTorch's product"])
def test_tiled_linear_equals_the_linear_layer(rows, dtype, vector_bits):
    torch.manual_seed(0)
    linear = nn.Linear(32, 16).to(dtype)
    assert TiledLinear.fits(linear) and not TiledLinear.fits(nn.Linear(32, 12).to(dtype))
    assert not TiledLinear.fits(nn.Linear(32, 16).double())  # other dtypes keep PyTorch's kernels
    tiled = TiledLinear(linear)
    if dtype == torch.float32:
        expected_most = cpu_kernels.F32_MAX_ROWS[vector_bits]
    else:  # many rows only with the pair products
        pairs = cpu_kernels.bf16_pair_products()
        expected_most = cpu_kernels.BF16_DOT_MAX_ROWS if pairs else cpu_kernels.MAX_ROWS
        assert not pairs or vector_bits == 512
    assert tiled.kernel_rows == expected_most
    count = {"one": 1, "the kernel's most": tiled.kernel_rows}.get(rows, tiled.kernel_rows + 1)
    x = torch.randn(1, count, 32).to(dtype)
    tolerance = 0.02 if dtype == torch.bfloat16 else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), linear(x), rtol=tolerance, atol=tolerance)


def assert_one_region_in_order(buffers: list[torch.Tensor]) -> None:
    """The buffers share one storage, the first at a huge-page boundary and each next at the end of the one before,
    rounded up to a multiple of 64 bytes: the order a forward reads them."""
    assert len({buffer.untyped_storage().data_ptr() for buffer in buffers}) == 1
    starts = [buffer.data_ptr() - buffers[0].data_ptr() for buffer in buffers]
    ends = [start + buffer.nbytes for start, buffer in zip(starts, buffers)]
    assert starts == [0, *(-(-end // 64) * 64 for end in ends[:-1])]
    if hasattr(cpu_kernels.mmap, "MADV_HUGEPAGE"):  # Linux: the region starts at a huge page (elsewhere plain memory)
        assert buffers[0].data_ptr() % cpu_kernels.HUGE_PAGE == 0


def anonymous_huge_pages_kib(address: int) -> int:
    """The kibibytes of transparent huge pages that back the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            low, high = (int(end, 16) for end in fields[0].split("-"))
            inside = low <= address < high
        elif inside and fields[0] == "AnonHugePages:":
            return int(fields[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_weights_region_is_plain_memory_where_the_os_refuses_huge_pages(monkeypatch):
    """A kernel without transparent huge pages answers the advice with EINVAL: the region still works."""

    def refuse(self, option):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(cpu_kernels.mmap, "mmap", type("Refusing", (cpu_kernels.mmap.mmap,), {"madvise": refuse}))
    region = cpu_kernels.huge_pages(cpu_kernels.HUGE_PAGE + 10)
    region.fill_(3)
    assert region.numel() == cpu_kernels.HUGE_PAGE + 10 and int(region.sum()) == 3 * region.numel()


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
    reason="needs Linux with transparent huge pages enabled (always or madvise)",
)
def test_the_weights_region_starts_at_a_huge_page_and_is_backed_by_huge_pages():
    region = cpu_kernels.huge_pages(3 * cpu_kernels.HUGE_PAGE + 100)
    assert region.dtype == torch.uint8 and region.numel() == 3 * cpu_kernels.HUGE_PAGE + 100
    assert region.data_ptr() % cpu_kernels.HUGE_PAGE == 0
    region.fill_(7)  # the first touch faults the pages in
    assert anonymous_huge_pages_kib(region.data_ptr()) >= 3 * cpu_kernels.HUGE_PAGE // 1024
    assert int(region.sum()) == 7 * region.numel()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoding_layout_tiles_the_layers_and_decodes_like_a_full_forward_loop(tmp_path, dtype):
    tokenizer = char_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tokenizer.vocab_size, n_embd=32, context_length=32, tie_embeddings=True)
    model = Transformer(config).to(dtype).eval()
    parameters = model.num_parameters()
    engine = Engine(model, tokenizer, decoding_layout=True)
    assert isinstance(model.blocks[0].attention.out, TiledLinear)
    tiles = [module.weight for module in model.modules() if isinstance(module, TiledLinear)]
    assert len(tiles) > 2 and tiles[0] is model.blocks[0].attention.qkv.weight
    assert_one_region_in_order(tiles)
    assert model.token_embedding.weight.dtype == dtype  # the tied head got its own tiled copy
    assert model.num_parameters() < parameters == engine.parameter_count  # tiles are buffers; reports say the model's
    prompt = tokenizer.encode("hello world")
    config = GenerationConfig(max_new_tokens=10, temperature=0, stop_at_end_of_text=False)
    assert engine.generate_ids([prompt], config)[0].token_ids == naive_greedy(model, prompt, 10)
    double = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, n_embd=32)).double().eval()
    use_decoding_layout(double)
    assert not any(isinstance(module, TiledLinear) for module in double.modules())


@needs_kernels
def test_decoding_layout_puts_quantized_weights_scales_and_minimums_in_one_region(tmp_path):
    tokenizer = char_tokenizer(tmp_path)
    config = GenerationConfig(max_new_tokens=12, temperature=0, stop_at_end_of_text=False)
    prompt = tokenizer.encode("hello world")
    tokens = []
    for layout in (False, True):
        torch.manual_seed(0)
        vocab = -(-tokenizer.vocab_size // 8) * 8  # a head the kernels tile
        model = Transformer(tiny_config(vocab_size=vocab, n_embd=64, n_head=4, context_length=32))
        engine = Engine(model.eval(), tokenizer, decoding_layout=layout, quantize="int4")
        tokens.append(engine.generate_ids([prompt], config)[0].token_ids)
    qkv, head = model.blocks[0].attention.qkv, model.lm_head
    assert isinstance(qkv, Int4Linear) and isinstance(head, Int8Linear) and qkv.layout == "tiles" and head.tiled
    buffers = [getattr(module, name) for module in model.modules() for name in getattr(module, "streamed", ())]
    assert buffers[:3] == [qkv.weight, qkv.scales, qkv.minimums] and buffers[-2:] == [head.weight, head.scales]
    assert_one_region_in_order(buffers)
    assert tokens[0] == tokens[1]  # the same values, only placed elsewhere


@needs_kernels
@pytest.mark.slow
def test_compiled_step_runs_the_kernels_and_gives_the_eager_tokens(tmp_path, monkeypatch):
    """int4 layers, an int8 head and the attention kernel in one compiled graph (Inductor traces the kernels through
    their registered output shapes), called from its C++ wrapper; autotuning is left out as in test_fast_decoding."""
    monkeypatch.setattr(runner_module, "CPU_INDUCTOR", {"freezing": True, "cpp_wrapper": True})
    tokenizer = char_tokenizer(tmp_path)
    changes = dict(vocab_size=tokenizer.vocab_size, n_embd=32, n_head=4, n_kv_head=2, n_layer=1, context_length=32)
    engines = []
    for compile in (False, True):
        torch.manual_seed(0)
        engines.append(Engine(Transformer(tiny_config(**changes)).eval(), tokenizer, quantize="int4", compile=compile))
    assert engines[1].model.blocks[0].attention.qkv.layout == "tiles"
    prompts = [tokenizer.encode(text) for text in ("hello", "abc def", "xyz")]
    config = GenerationConfig(max_new_tokens=8, temperature=0, stop_at_end_of_text=False)
    eager, compiled = ([c.token_ids for c in engine.generate_ids(prompts, config)] for engine in engines)
    assert compiled == eager

// Host-only checks of csrc/tma_descriptors.h, compiled with the extension's nvcc flags and run by
// tests/test_cuda_host_code.py (no GPU needed). Prints one "ok <check>" line per passing check and
// exits 1 at the first failure.
#include "tma_descriptors.h"

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

using namespace cute;

#define CHECK(cond, what)                                        \
  do {                                                           \
    if (!(cond)) {                                               \
      std::printf("FAILED %s (%s:%d)\n", what, __FILE__, __LINE__); \
      std::exit(1);                                              \
    }                                                            \
    std::printf("ok %s\n", what);                                \
  } while (0)

// A stand-in for a CuTe TMA copy: a descriptor and which make() call produced it.
struct FakeCopy {
  cute::TmaDescriptor desc{};
  int made_by = 0;
  const cute::TmaDescriptor* get_tma_descriptor() const { return &desc; }
};

FakeCopy fake(int id, bool encoded) {
  FakeCopy c;
  if (encoded) std::memcpy(&c.desc, &id, sizeof(id));  // any non-zero byte: what an encoded one has
  c.made_by = id;
  return c;
}

aimv2::TmaKey key_of(uintptr_t address, int64_t seqlen) {
  return {reinterpret_cast<const void*>(address), 0, 15, {2, 3, seqlen, 128}, {3 * seqlen * 128, seqlen * 128, 128, 1}};
}

void check_cache() {
  aimv2::TmaCache<FakeCopy> cache;
  bool built = false;
  int calls = 0;
  auto make = [&](bool encoded) {
    return [&calls, encoded] { return fake(++calls, encoded); };
  };
  FakeCopy first = cache.get(key_of(0x1000, 67), make(true), built);
  CHECK(built && first.made_by == 1, "a miss builds the descriptor");
  FakeCopy again = cache.get(key_of(0x1000, 67), make(true), built);
  CHECK(built && again.made_by == 1 && calls == 1 && cache.builds() == 1, "the same layout is served from the cache");
  FakeCopy other = cache.get(key_of(0x1000, 68), make(true), built);
  CHECK(other.made_by == 2, "another shape at the same address is a new descriptor");
  FakeCopy moved = cache.get(key_of(0x2000, 67), make(true), built);
  CHECK(moved.made_by == 3, "another address is a new descriptor");
  cache.get(key_of(0x3000, 67), make(false), built);
  CHECK(!built, "a refused descriptor is reported");
  cache.get(key_of(0x3000, 67), make(false), built);
  CHECK(!built && calls == 5, "a refused descriptor is not cached");
  for (size_t i = 0; i < aimv2::TmaCache<FakeCopy>::kCapacity + 10; ++i) {
    cache.get(key_of(0x10000 + 16 * i, 67), make(true), built);
  }
  const uint64_t before = cache.builds();
  cache.get(key_of(0x1000, 67), make(true), built);
  CHECK(cache.builds() == before + 1, "a full cache starts over instead of growing");
}

// CuTe's own make_tma_copy on a layout the driver refuses (a row stride of 65 elements: not a multiple
// of 16 bytes), with the extension's flags: the process must go on and the descriptor stay zero.
void check_refused_descriptor() {
  using Element = cute::bfloat16_t;
  static Element storage[4 * 65 * 128];
  auto gmem = make_tensor(make_gmem_ptr(static_cast<Element const*>(storage)), make_shape(64, 64, 1, 1),
                          make_stride(int64_t{65}, _1{}, int64_t{65 * 64}, int64_t{65 * 64}));
  auto smem = tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<_64, _64>{});
  auto tma = make_tma_copy(SM90_TMA_LOAD{}, gmem, smem, Shape<_64, _64>{}, _1{});
  CHECK(!aimv2::tma_descriptor_built(tma.get_tma_descriptor()), "a refused TMA descriptor is left zero, no abort");

  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) {
    auto dense = make_tensor(make_gmem_ptr(static_cast<Element const*>(storage)), make_shape(64, 64, 1, 1),
                             make_stride(int64_t{64}, _1{}, int64_t{64 * 64}, int64_t{64 * 64}));
    auto ok = make_tma_copy(SM90_TMA_LOAD{}, dense, smem, Shape<_64, _64>{}, _1{});
    CHECK(aimv2::tma_descriptor_built(ok.get_tma_descriptor()), "a valid layout gets a non-zero descriptor");
  } else {
    std::printf("skip valid-layout check: no CUDA driver on this machine\n");
  }
}

int main() {
  check_cache();
  check_refused_descriptor();
  std::printf("all checks passed\n");
  return 0;
}

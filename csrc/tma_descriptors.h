// Host-side TMA descriptors of the Hopper attention kernels (csrc/attention_sm90.cu): a check that one
// was built, and a cache so that a layer called again on the same tensors does not rebuild them.
//
// Building a descriptor (CuTe's make_tma_copy) looks up the driver's cuTensorMapEncodeTiled and calls
// it: host microseconds per tensor, 3 tensors per forward and 8 descriptors per backward, on every
// attention layer of every step. A descriptor depends only on the tensor's address, dtype, sizes and
// strides (and on the box, fixed by the copy's C++ type), so it is cached under exactly those; the
// caching allocator hands a training step the same addresses step after step, so steady state builds
// none. Without torch: tests/cuda_host/tma_descriptors_test.cu compiles and runs this on the CPU.
#pragma once

#include <cute/arch/copy_sm90_desc.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <unordered_map>

namespace aimv2 {

// What a descriptor is made of: the (B, H, S, D) tensor as the kernels read it.
struct TmaKey {
  const void* data = nullptr;
  int device = 0;
  int dtype = 0;
  std::array<int64_t, 4> sizes{};
  std::array<int64_t, 4> strides{};

  friend bool operator==(const TmaKey& a, const TmaKey& b) {
    return a.data == b.data && a.device == b.device && a.dtype == b.dtype && a.sizes == b.sizes &&
           a.strides == b.strides;
  }
};

struct TmaKeyHash {
  size_t operator()(const TmaKey& k) const {
    size_t h = std::hash<const void*>{}(k.data);
    const auto mix = [&h](int64_t v) { h ^= std::hash<int64_t>{}(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
    mix(k.device);
    mix(k.dtype);
    for (int64_t v : k.sizes) mix(v);
    for (int64_t v : k.strides) mix(v);
    return h;
  }
};

// CuTe zero-initializes the descriptor and leaves it zero when the driver refuses to encode it (it
// then prints the arguments and asserts; the build defines NDEBUG, so the process goes on and the
// caller raises an error naming the tensor instead). An encoded descriptor is never all zero: it holds
// the global address.
inline bool tma_descriptor_built(const cute::TmaDescriptor* desc) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(desc);
  for (size_t i = 0; i < sizeof(cute::TmaDescriptor); ++i) {
    if (bytes[i] != 0) return true;
  }
  return false;
}

// The TMA copies of one kind (the C++ type fixes box, swizzle and element type), by TmaKey. Only
// built descriptors are kept. Bounded: when full it starts over (a workload cycling through more
// distinct tensors than this rebuilds, as it did before the cache). Thread-safe.
template <class Tma>
class TmaCache {
 public:
  static constexpr size_t kCapacity = 1024;

  // The copy for `key`, made by `make()` on a miss. `built` says whether its descriptor was encoded.
  template <class Make>
  Tma get(const TmaKey& key, Make&& make, bool& built) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto hit = copies_.find(key);
      if (hit != copies_.end()) {
        built = true;
        return hit->second;
      }
    }
    Tma tma = make();
    built = tma_descriptor_built(tma.get_tma_descriptor());
    std::lock_guard<std::mutex> lock(mutex_);
    ++builds_;
    if (built) {
      if (copies_.size() >= kCapacity) copies_.clear();
      copies_.emplace(key, tma);
    }
    return tma;
  }

  // Descriptors encoded so far (hits do not count): what the tests read.
  uint64_t builds() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return builds_;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<TmaKey, Tma, TmaKeyHash> copies_;
  uint64_t builds_ = 0;
};

}  // namespace aimv2

// The TVM wheel's headers include <tvm/support/io.h> but do not ship it. The CCL backend
// never serialises tensors; these declarations only let tvm/runtime/tensor.h compile.
#pragma once
#include <cstddef>

namespace tvm {
namespace support {
class Stream {
 public:
  virtual ~Stream() = default;
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;
  template <typename T> bool Read(T* out);
  template <typename T> void Write(const T& value);
  template <typename T> bool ReadArray(T* data, size_t n);
  template <typename T> void WriteArray(const T* data, size_t n);
};
}  // namespace support
}  // namespace tvm

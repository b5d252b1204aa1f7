#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

// Shared by the op-family binding files (attention.cpp, sparse.cpp, quest.cpp).
// A pointer field as a Python int property.
#define VATTN_PTR(Cls, field)                                                    \
  def_property(                                                                  \
      #field, [](const Cls& s) { return reinterpret_cast<uintptr_t>(s.field); }, \
      [](Cls& s, uintptr_t v) { s.field = reinterpret_cast<decltype(Cls::field)>(v); })
#define VATTN_RW(Cls, field) def_readwrite(#field, &Cls::field)

namespace vattn {
void bind_memory(pybind11::module_& m);     // bindings/memory.cpp
void bind_attention(pybind11::module_& m);  // bindings/attention.cpp
void bind_sparse(pybind11::module_& m);     // bindings/sparse.cpp
void bind_quest(pybind11::module_& m);      // bindings/quest.cpp

namespace bindings {
// The compute functions run without the GIL so other Python threads can go on.
using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;

template <class T>
T* as_ptr(uintptr_t v) {
  return reinterpret_cast<T*>(v);
}
}  // namespace bindings
}  // namespace vattn

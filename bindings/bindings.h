#pragma once
#include <pybind11/pybind11.h>

namespace vattn {
void bind_memory(pybind11::module_& m);     // bindings/memory.cpp
void bind_attention(pybind11::module_& m);  // bindings/attention.cpp
void bind_sparse(pybind11::module_& m);     // bindings/sparse.cpp
void bind_quest(pybind11::module_& m);      // bindings/quest.cpp
}  // namespace vattn

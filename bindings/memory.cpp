// Placeholder: the memory-manager bindings land here.
#include "bindings.h"
namespace vattn { void bind_memory(pybind11::module_&) {} }

// Placeholder: the attention-op bindings land here.
#include "bindings.h"
namespace vattn { void bind_attention(pybind11::module_&) {} }

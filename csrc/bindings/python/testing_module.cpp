#include "testing_module.h"

#include <pybind11/stl.h>

#include "transports/tcp/auth.h"

namespace py = pybind11;

void bind_testing(py::module_ m) {
  m.def("hmac_sha256", [](const std::string& key, const py::bytes& data) {
    std::string bytes = data;
    auto mac = mooncake_vllm::tcp::hmac_sha256(key, reinterpret_cast<const uint8_t*>(bytes.data()),
                                               bytes.size());
    return py::bytes(reinterpret_cast<const char*>(mac.data()), mac.size());
  });
}

// mooncake_vllm._engine: a thin pybind11 face over TransferEngine. Batches cross as buffers
// (numpy uint64 arrays), and every call that can block runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "mooncake_vllm/engine.h"
#include "testing_module.h"
#ifdef MV_WITH_RDMA
#include "transports/rdma/verbs.h"
#endif

namespace py = pybind11;
using namespace mooncake_vllm;

namespace {

// A 1-D, contiguous buffer of 8-byte integers, viewed without copying.
struct U64View {
  py::buffer_info info;
  const uint64_t* data() const { return static_cast<const uint64_t*>(info.ptr); }
  size_t size() const { return static_cast<size_t>(info.shape.empty() ? 0 : info.shape[0]); }
};

U64View view_u64(const py::buffer& buffer, const char* what) {
  U64View view{buffer.request()};
  std::string fmt = view.info.format;
  while (!fmt.empty() && std::strchr("<>=@!", fmt.front())) fmt.erase(0, 1);
  bool integer = fmt.size() == 1 && std::strchr("qQlLnN", fmt[0]) != nullptr;
  if (view.info.ndim != 1 || view.info.itemsize != 8 || !integer)
    throw InvalidArgument(std::string(what) + " must be a 1-D buffer of uint64 (got ndim=" +
                          std::to_string(view.info.ndim) + ", format '" + view.info.format + "')");
  if (view.size() > 1 && view.info.strides[0] != 8)
    throw InvalidArgument(std::string(what) + " must be contiguous");
  return view;
}

OpCode parse_op(const std::string& op) {
  if (op == "write") return OpCode::kWrite;
  if (op == "read") return OpCode::kRead;
  throw InvalidArgument("op must be 'write' or 'read', not '" + op + "'");
}

template <typename T>
T required(const py::dict& desc, const char* key) {
  if (!desc.contains(key))
    throw InvalidArgument(std::string("segment descriptor is missing '") + key + "'");
  try {
    return desc[key].cast<T>();
  } catch (const py::cast_error&) {
    throw InvalidArgument(std::string("segment descriptor field '") + key + "' has the wrong type");
  }
}

py::dict to_dict(const SegmentDescriptor& desc) {
  py::dict out;
  out["name"] = desc.name;
  out["protocol"] = desc.protocol;
  out["endpoint"] = desc.endpoint;
  py::list regions;
  for (const auto& [addr, len] : desc.regions) regions.append(py::make_tuple(addr, len));
  out["regions"] = py::list(regions);
  // JSON has no tuples; lists survive a round trip unchanged.
  py::list region_lists;
  for (const auto& [addr, len] : desc.regions) {
    py::list pair;
    pair.append(addr);
    pair.append(len);
    region_lists.append(pair);
  }
  out["regions"] = region_lists;
  if (desc.protocol == "rdma") {
    py::list devices;
    for (const auto& dev : desc.rdma_devices) {
      py::dict d;
      d["name"] = dev.name;
      d["gid"] = dev.gid;
      d["lid"] = dev.lid;
      d["port"] = dev.port;
      devices.append(d);
    }
    out["rdma_devices"] = devices;
    out["rkeys"] = desc.rkeys;
  }
  return out;
}

SegmentDescriptor from_dict(const py::dict& d) {
  SegmentDescriptor desc;
  desc.name = required<std::string>(d, "name");
  desc.protocol = required<std::string>(d, "protocol");
  desc.endpoint = required<std::string>(d, "endpoint");
  auto regions = required<std::vector<std::vector<uint64_t>>>(d, "regions");
  for (const auto& r : regions) {
    if (r.size() != 2) throw InvalidArgument("segment descriptor 'regions' entries must be [addr, length]");
    desc.regions.emplace_back(r[0], r[1]);
  }
  if (desc.protocol == "rdma") {
    for (const auto& item : required<py::list>(d, "rdma_devices")) {
      auto dev = item.cast<py::dict>();
      RdmaDeviceInfo info;
      info.name = required<std::string>(dev, "name");
      info.gid = required<std::string>(dev, "gid");
      info.lid = required<uint32_t>(dev, "lid");
      info.port = required<uint32_t>(dev, "port");
      desc.rdma_devices.push_back(info);
    }
    desc.rkeys = required<std::vector<std::vector<uint32_t>>>(d, "rkeys");
    if (desc.rkeys.size() != desc.regions.size())
      throw InvalidArgument("segment descriptor 'rkeys' must have one entry per region");
  }
  return desc;
}

py::tuple state_tuple(BatchState state, const std::string& error) {
  return py::make_tuple(static_cast<int>(state), error);
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
  m.doc() = "mooncake_vllm native transfer engine (use mooncake_vllm.engine instead)";
  static py::exception<TransferError> transfer_error(m, "TransferError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TransferError& e) {
      py::set_error(transfer_error, e.what());
    } catch (const InvalidArgument& e) {
      py::set_error(PyExc_ValueError, e.what());
    }
  });
  m.attr("TRANSPORTS") = compiled_transports();
  m.def("rdma_device_names", [] {
#ifdef MV_WITH_RDMA
    return rdma::make_ibverbs()->device_names();
#else
    return std::vector<std::string>{};
#endif
  }, "RDMA devices that libibverbs lists (what protocol='auto' would use).");
  m.attr("STATE_PENDING") = static_cast<int>(BatchState::kPending);
  m.attr("STATE_DONE") = static_cast<int>(BatchState::kDone);
  m.attr("STATE_FAILED") = static_cast<int>(BatchState::kFailed);

  py::class_<TransferEngine>(m, "Engine")
      .def(py::init([](const std::string& hostname, const std::string& protocol, int port,
                       const std::string& cluster_token, double timeout_s,
                       int connections_per_peer, const std::vector<std::string>& rdma_devices,
                       const std::string& verbs, int fake_nics, uint64_t rdma_slice_bytes,
                       int rdma_signal_every, int rdma_gid_index, int rdma_port, int rdma_cq_depth,
                       int max_connections, int max_connections_per_address,
                       double idle_timeout_s) {
             if (port < 0 || port > 65535) throw InvalidArgument("port must be in 0..65535");
             EngineConfig config;
             config.hostname = hostname;
             config.protocol = protocol;
             config.port = static_cast<uint16_t>(port);
             config.cluster_token = cluster_token;
             config.timeout_s = timeout_s;
             config.connections_per_peer = connections_per_peer;
             config.rdma_devices = rdma_devices;
             config.verbs = verbs;
             config.fake_nics = fake_nics;
             config.rdma_slice_bytes = rdma_slice_bytes;
             config.rdma_signal_every = rdma_signal_every;
             config.rdma_gid_index = rdma_gid_index;
             config.rdma_port = rdma_port;
             config.rdma_cq_depth = rdma_cq_depth;
             config.max_connections = max_connections;
             config.max_connections_per_address = max_connections_per_address;
             config.idle_timeout_s = idle_timeout_s;
             py::gil_scoped_release release;
             return std::make_unique<TransferEngine>(config);
           }),
           py::arg("hostname"), py::arg("protocol"), py::arg("port"), py::arg("cluster_token"),
           py::arg("timeout_s"), py::arg("connections_per_peer"), py::arg("rdma_devices"),
           py::arg("verbs") = "ibverbs", py::arg("fake_nics") = 2,
           py::arg("rdma_slice_bytes") = 1 << 20, py::arg("rdma_signal_every") = 16,
           py::arg("rdma_gid_index") = -1, py::arg("rdma_port") = 0,
           py::arg("rdma_cq_depth") = 4096,
           py::arg("max_connections") = 256, py::arg("max_connections_per_address") = 64,
           py::arg("idle_timeout_s") = 120.0)
      .def_property_readonly("protocol", &TransferEngine::protocol)
      .def_property_readonly("protocol_note", &TransferEngine::protocol_note)
      .def_property_readonly("endpoint", &TransferEngine::endpoint)
      .def_property_readonly("live_batches", &TransferEngine::live_batches)
      .def("stats", &TransferEngine::stats)
      .def("register", &TransferEngine::register_memory, py::arg("addr"), py::arg("length"),
           py::arg("remote_read") = false, py::call_guard<py::gil_scoped_release>())
      .def("unregister", &TransferEngine::unregister_memory, py::arg("addr"),
           py::call_guard<py::gil_scoped_release>())
      .def("descriptor", [](const TransferEngine& e) { return to_dict(e.descriptor()); })
      .def("open_segment",
           [](TransferEngine& e, const py::dict& d) {
             SegmentDescriptor desc = from_dict(d);
             py::gil_scoped_release release;
             return e.open_segment(desc);
           })
      .def("submit",
           [](TransferEngine& e, uint64_t segment, const std::string& op, const py::buffer& local,
              const py::buffer& remote, const py::buffer& lengths) {
             OpCode code = parse_op(op);
             U64View l = view_u64(local, "local"), r = view_u64(remote, "remote"),
                     n = view_u64(lengths, "lengths");
             if (l.size() != r.size() || l.size() != n.size())
               throw InvalidArgument("local, remote and lengths must have the same length (" +
                                     std::to_string(l.size()) + ", " + std::to_string(r.size()) +
                                     ", " + std::to_string(n.size()) + ")");
             py::gil_scoped_release release;
             return e.submit(segment, code, l.data(), r.data(), n.data(), l.size());
           })
      .def("status",
           [](const TransferEngine& e, uint64_t id) {
             std::string error;
             BatchState state = e.status(id, &error);
             return state_tuple(state, error);
           })
      .def("wait",
           [](const TransferEngine& e, uint64_t id, double timeout_s) {
             std::string error;
             BatchState state;
             {
               py::gil_scoped_release release;
               state = e.wait(id, timeout_s, &error);
             }
             return state_tuple(state, error);
           },
           py::arg("batch_id"), py::arg("timeout_s") = -1.0)
      .def("release", &TransferEngine::release)
      .def("close", &TransferEngine::close, py::call_guard<py::gil_scoped_release>());

  bind_testing(m.def_submodule("_testing", "test-only hooks (software test doubles)"));
}

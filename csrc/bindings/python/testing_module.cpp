#include "testing_module.h"

#include <pybind11/stl.h>

#include "mooncake_vllm/types.h"
#include "transports/common/auth.h"
#include "transports/common/threads.h"
#ifdef MV_WITH_RDMA
#include "transports/rdma/fake_verbs.h"
#endif

namespace py = pybind11;

#ifdef MV_WITH_RDMA
namespace {
ibv_wc_status parse_status(const std::string& name) {
  static const std::pair<const char*, ibv_wc_status> known[] = {
      {"REM_ACCESS_ERR", IBV_WC_REM_ACCESS_ERR}, {"RETRY_EXC_ERR", IBV_WC_RETRY_EXC_ERR},
      {"LOC_PROT_ERR", IBV_WC_LOC_PROT_ERR},     {"REM_OP_ERR", IBV_WC_REM_OP_ERR},
      {"LOC_LEN_ERR", IBV_WC_LOC_LEN_ERR},       {"RNR_RETRY_EXC_ERR", IBV_WC_RNR_RETRY_EXC_ERR},
  };
  for (const auto& [text, status] : known)
    if (name == text) return status;
  throw mooncake_vllm::InvalidArgument("unknown work-completion status '" + name + "'");
}
}  // namespace
#endif

void bind_testing(py::module_ m) {
  m.def("hmac_sha256", [](const std::string& key, const py::bytes& data) {
    std::string bytes = data;
    auto mac = mooncake_vllm::net::hmac_sha256(key, reinterpret_cast<const uint8_t*>(bytes.data()),
                                               bytes.size());
    return py::bytes(reinterpret_cast<const char*>(mac.data()), mac.size());
  });
  m.def("inject_thread_start_failures", &mooncake_vllm::net::inject_thread_start_failures,
        py::arg("count"), "The next `count` engine threads fail to start (as on EAGAIN).");
#ifdef MV_WITH_RDMA
  using namespace mooncake_vllm::rdma;
  m.def("fake_verbs_stats", [] {
    FakeStats s = fake_stats();
    py::dict out;
    out["post_send_calls"] = s.post_send_calls;
    out["wrs_posted"] = s.wrs_posted;
    out["wrs_signaled"] = s.wrs_signaled;
    out["completions"] = s.completions;
    out["error_completions"] = s.error_completions;
    out["cq_overflows"] = s.cq_overflows;
    out["send_queue_full"] = s.send_queue_full;
    out["max_outstanding"] = s.max_outstanding;
    out["bytes_by_device"] = s.bytes_by_device;
    out["wrs_by_device"] = s.wrs_by_device;
    out["qp_transitions"] = s.qp_transitions;
    out["wr_lengths"] = s.wr_lengths;
    out["live_qps"] = s.live_qps;
    out["max_cq_outstanding"] = s.max_cq_outstanding;
    out["qp_attrs"] = s.qp_attrs;
    return out;
  }, "Counters of the FakeVerbs software NIC (test double), shared by the whole process.");
  m.def("fake_verbs_reset", &fake_reset_stats);
  m.def("fake_verbs_inject_stall", &fake_inject_stall,
        "The next WR, and all after it on its QP, never complete until the QP enters ERR.");
  m.def("fake_verbs_release_stall", &fake_release_stall,
        "Stalled WRs execute and complete now (the peer answers again).");
  m.def("fake_verbs_inject_partial_post", &fake_inject_partial_post, py::arg("posted"),
        "The next post_send of a longer chain takes only its first `posted` WRs (ENOMEM, bad_wr).");
  m.def("fake_verbs_configure", [](int ports, int active_port, int active_mtu) {
    FakeConfig config;
    config.ports = ports;
    config.active_port = active_port;
    config.active_mtu = static_cast<ibv_mtu>(active_mtu);
    fake_configure(config);
  }, py::arg("ports") = 1, py::arg("active_port") = 1, py::arg("active_mtu") = 5,
     "How fake NICs opened from now on look (active_mtu: enum ibv_mtu, 5 = 4096 bytes).");
  m.def("fake_verbs_inject_error", [](const std::string& status, uint64_t after_wrs) {
    fake_inject_error(parse_status(status), after_wrs);
  }, py::arg("status"), py::arg("after_wrs") = 0,
     "The after_wrs-th work request executed from now fails with IBV_WC_<status>.");
#endif
}

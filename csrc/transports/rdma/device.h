// One opened RDMA device: its protection domain and completion queue, and the address this
// engine uses on it (port, GID index, LID, MTU), chosen once when the device is opened.
#pragma once

#include <infiniband/verbs.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "mooncake_vllm/types.h"
#include "verbs.h"

namespace mooncake_vllm::rdma {

// "<what> failed: <strerror(err)>" (EIO when a verbs call failed without an errno).
std::string sys_error(const std::string& what, int err);


struct Device {
  Device(Verbs& verbs, int index, const std::string& name, const EngineConfig& config);
  ~Device();  // destroys the CQ, the PD and closes the device (QPs and MRs must be gone)
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  Verbs& verbs;
  const int index;
  const std::string name;
  ibv_context* ctx = nullptr;
  ibv_pd* pd = nullptr;
  ibv_cq* cq = nullptr;
  int cq_depth = 0;
  uint8_t port = 1;
  int gid_index = 0;
  ibv_gid gid{};
  uint16_t lid = 0;
  ibv_mtu mtu = IBV_MTU_1024;  // the port's active MTU; a QP uses the smaller of both ends'
  bool ethernet = false;       // RoCE: routed by GID (hop limit matters), no LID

  // Completion budget: WRs outstanding on every QP of this CQ together. A QP moved to ERR
  // flushes each of its outstanding WRs with a completion of its own, signalled or not, so the
  // CQ must have room for all of them, not only the signalled ones.
  std::mutex budget_mu;
  std::condition_variable budget_cv;
  uint32_t outstanding = 0;
  // Returns `wrs` to the budget (their completions arrived, or they were never posted).
  void release(uint32_t wrs);
};

// The GID index to use on `port`: `override_index` when >= 0, else on RoCE a RoCE v2 GID
// holding an IPv4-mapped address (routable over IPv4 fabrics), else any RoCE v2 GID, else an
// IPv4-mapped one, else index 0; on InfiniBand index 0.
int choose_gid_index(Verbs& verbs, ibv_context* ctx, uint8_t port, const ibv_port_attr& attr,
                     int override_index, ibv_gid* gid);

}  // namespace mooncake_vllm::rdma

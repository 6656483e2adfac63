#include "device.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "mooncake_vllm/log.h"

namespace mooncake_vllm::rdma {

std::string sys_error(const std::string& what, int err) {
  return what + " failed: " + std::strerror(err ? err : EIO);
}

namespace {

bool ipv4_mapped(const ibv_gid& gid) {
  static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  return std::memcmp(gid.raw, prefix, sizeof(prefix)) == 0;
}

bool zero_gid(const ibv_gid& gid) {
  for (uint8_t b : gid.raw)
    if (b) return false;
  return true;
}

// The first ACTIVE port, or `wanted` when configured.
uint8_t choose_port(Verbs& verbs, ibv_context* ctx, const std::string& name, int wanted,
                    ibv_port_attr* attr) {
  ibv_device_attr dev{};
  if (int rc = verbs.query_device(ctx, &dev))
    throw TransferError(sys_error("ibv_query_device on " + name, rc));
  if (wanted > 0) {
    if (wanted > dev.phys_port_cnt)
      throw TransferError("RDMA device " + name + " has no port " + std::to_string(wanted));
    if (int rc = verbs.query_port(ctx, static_cast<uint8_t>(wanted), attr))
      throw TransferError(sys_error("ibv_query_port on " + name, rc));
    if (attr->state != IBV_PORT_ACTIVE)
      MV_LOG(kWarn, "RDMA device " << name << " port " << wanted << " is not active");
    return static_cast<uint8_t>(wanted);
  }
  for (int p = 1; p <= dev.phys_port_cnt; ++p) {
    if (verbs.query_port(ctx, static_cast<uint8_t>(p), attr) == 0 && attr->state == IBV_PORT_ACTIVE)
      return static_cast<uint8_t>(p);
  }
  throw TransferError("RDMA device " + name + " has no active port (of " +
                      std::to_string(dev.phys_port_cnt) + ")");
}

}  // namespace

int choose_gid_index(Verbs& verbs, ibv_context* ctx, uint8_t port, const ibv_port_attr& attr,
                     int override_index, ibv_gid* gid) {
  if (override_index >= 0) {
    if (int rc = verbs.query_gid(ctx, port, override_index, gid))
      throw TransferError(sys_error("ibv_query_gid (rdma_gid_index " +
                                        std::to_string(override_index) + ")",
                                    rc));
    return override_index;
  }
  if (attr.link_layer != IBV_LINK_LAYER_ETHERNET) {
    if (int rc = verbs.query_gid(ctx, port, 0, gid))
      throw TransferError(sys_error("ibv_query_gid", rc));
    return 0;
  }
  int best = -1, best_rank = -1;
  for (int i = 0; i < attr.gid_tbl_len; ++i) {
    ibv_gid candidate{};
    ibv_gid_type type = IBV_GID_TYPE_ROCE_V1;
    if (verbs.query_gid(ctx, port, i, &candidate) != 0 || zero_gid(candidate)) continue;
    if (verbs.query_gid_type(ctx, port, i, &type) != 0) continue;
    bool v2 = type == IBV_GID_TYPE_ROCE_V2, v4 = ipv4_mapped(candidate);
    int rank = (v2 ? 2 : 0) + (v4 ? 1 : 0);
    if (rank > best_rank) {
      best = i;
      best_rank = rank;
      *gid = candidate;
    }
  }
  if (best < 0) throw TransferError("no usable GID in the table of port " + std::to_string(port));
  return best;
}

Device::Device(Verbs& v, int idx, const std::string& device_name, const EngineConfig& config)
    : verbs(v), index(idx), name(device_name) {
  ctx = verbs.open_device(name);
  if (!ctx) throw TransferError(sys_error("opening RDMA device " + name, errno));
  try {
    ibv_port_attr attr{};
    port = choose_port(verbs, ctx, name, config.rdma_port, &attr);
    lid = attr.lid;
    mtu = attr.active_mtu;
    ethernet = attr.link_layer == IBV_LINK_LAYER_ETHERNET;
    gid_index = choose_gid_index(verbs, ctx, port, attr, config.rdma_gid_index, &gid);
    pd = verbs.alloc_pd(ctx);
    if (!pd) throw TransferError(sys_error("ibv_alloc_pd on " + name, errno));
    cq_depth = config.rdma_cq_depth;
    cq = verbs.create_cq(ctx, cq_depth);
    if (!cq) throw TransferError(sys_error("ibv_create_cq on " + name, errno));
  } catch (...) {
    if (pd) verbs.dealloc_pd(pd);
    verbs.close_device(ctx);
    throw;
  }
  MV_LOG(kDebug, "RDMA device " << name << ": port " << int(port) << ", GID index " << gid_index
                                << ", active MTU " << (128 << mtu));
}

void Device::release(uint32_t wrs) {
  if (!wrs) return;
  std::lock_guard lock(budget_mu);
  outstanding -= std::min(outstanding, wrs);
  budget_cv.notify_all();
}

Device::~Device() {
  if (cq) verbs.destroy_cq(cq);
  if (pd) verbs.dealloc_pd(pd);
  if (ctx) verbs.close_device(ctx);
}

}  // namespace mooncake_vllm::rdma

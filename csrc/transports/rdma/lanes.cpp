#include "lanes.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>

namespace mooncake_vllm::rdma {

namespace {

// RoCE v2 packets are routed (IP): a hop limit of 1 would drop them at the first router.
constexpr uint8_t kHopLimit = 64;
// QPs allow both; each MR decides whether its region may be read remotely.
constexpr int kQpAccess =
    IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;

// Random, so that packets of an old connection between the same QP numbers are not taken
// for the new one's.
uint32_t random_psn() {
  static thread_local std::mt19937 gen(std::random_device{}());
  return gen() & 0xffffff;  // PSNs are 24 bits
}

void modify(Verbs& verbs, Lane& lane, ibv_qp_attr& attr, int mask, const char* state) {
  if (int rc = verbs.modify_qp(lane.qp, &attr, mask))
    throw TransferError(sys_error("moving QP " + std::to_string(lane.qp->qp_num) + " on " +
                                      lane.device->name + " to " + state,
                                  rc));
}

}  // namespace

std::shared_ptr<Lane> create_lane(Verbs& verbs, Device* dev, int remote_device) {
  ibv_qp_init_attr init{};
  init.send_cq = dev->cq;
  init.recv_cq = dev->cq;
  init.qp_type = IBV_QPT_RC;
  init.sq_sig_all = 0;  // selective signalling: we mark the WRs that complete
  init.cap.max_send_wr = kMaxSendWr;
  init.cap.max_recv_wr = 1;
  init.cap.max_send_sge = 1;
  init.cap.max_recv_sge = 1;
  ibv_qp* qp = verbs.create_qp(dev->pd, &init);
  if (!qp) throw TransferError(sys_error("ibv_create_qp on " + dev->name, errno));
  auto lane = std::make_shared<Lane>();
  lane->device = dev;
  lane->remote_device = remote_device;
  lane->qp = qp;
  lane->psn = random_psn();
  try {
    ibv_qp_attr attr{};
    attr.qp_state = IBV_QPS_INIT;
    attr.pkey_index = 0;
    attr.port_num = dev->port;
    attr.qp_access_flags = kQpAccess;
    modify(verbs, *lane, attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS,
           "INIT");
  } catch (...) {
    destroy_lane(verbs, *lane);
    throw;
  }
  return lane;
}

// Destroys the QP (it must have no work the poller still waits for) and frees what only
// its WRs referred to.
void destroy_lane(Verbs& verbs, Lane& lane) {
  std::vector<std::unique_ptr<Chain>> orphans;
  uint32_t held = 0;
  {
    std::lock_guard lock(lane.mu);
    if (lane.qp) verbs.destroy_qp(lane.qp);
    lane.qp = nullptr;
    orphans.swap(lane.orphans);
    held = lane.outstanding;
    lane.outstanding = 0;
  }
  lane.device->release(held);
}


// INIT -> RTR (towards the remote QP) -> RTS.
void connect_lane(Verbs& verbs, Lane& lane, const QpEndpoint& remote) {
  const Device& dev = *lane.device;
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RTR;
  // Both ends use the smaller active MTU, so neither sends packets the other cannot take.
  attr.path_mtu = static_cast<ibv_mtu>(std::min<int>(dev.mtu, remote.mtu));
  attr.dest_qp_num = remote.qpn;
  attr.rq_psn = remote.psn;
  attr.max_dest_rd_atomic = 16;
  attr.min_rnr_timer = 12;
  attr.ah_attr.is_global = 1;
  attr.ah_attr.grh.dgid = remote.gid;
  attr.ah_attr.grh.sgid_index = static_cast<uint8_t>(dev.gid_index);
  attr.ah_attr.grh.hop_limit = kHopLimit;
  attr.ah_attr.dlid = dev.ethernet ? 0 : static_cast<uint16_t>(remote.lid);
  attr.ah_attr.port_num = dev.port;
  modify(verbs, lane, attr,
         IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
             IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER,
         "RTR");
  attr = ibv_qp_attr{};
  attr.qp_state = IBV_QPS_RTS;
  attr.timeout = 14;
  attr.retry_cnt = 7;
  attr.rnr_retry = 7;
  attr.sq_psn = lane.psn;
  attr.max_rd_atomic = 16;
  modify(verbs, lane, attr,
         IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
             IBV_QP_MAX_QP_RD_ATOMIC,
         "RTS");
}

QpEndpoint endpoint_of(const Lane& lane, int lane_index, int device) {
  const Device& dev = *lane.device;
  return {lane_index, device, lane.qp->qp_num, dev.gid, dev.lid, lane.psn, int(dev.mtu)};
}

void lane_to_error(Verbs& verbs, Lane& lane) {
  std::lock_guard lock(lane.mu);
  if (!lane.qp) return;
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_ERR;
  verbs.modify_qp(lane.qp, &attr, IBV_QP_STATE);  // flushes every outstanding WR
}

}  // namespace mooncake_vllm::rdma

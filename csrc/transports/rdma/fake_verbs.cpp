#include "fake_verbs.h"

#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>

namespace mooncake_vllm::rdma {

namespace {

struct FakeContext {
  ibv_context ctx{};
  std::string name;
  ibv_gid gid{};
  uint16_t lid = 0;
};
struct FakePd {
  ibv_pd pd{};
  FakeContext* dev = nullptr;
};
struct FakeMr {
  ibv_mr mr{};
  FakePd* pd = nullptr;
  int access = 0;
};
struct FakeQp;
struct FakeCqe {
  ibv_wc wc;
  FakeQp* qp;
  uint64_t seq;
};
struct FakeCq {
  ibv_cq cq{};
  int capacity = 0;
  std::deque<FakeCqe> entries;
};
struct FakeQp {
  ibv_qp qp{};
  FakePd* pd = nullptr;
  FakeCq* send_cq = nullptr;
  ibv_qp_state state = IBV_QPS_RESET;
  uint32_t dest_qpn = 0;
  ibv_gid dgid{};
  uint32_t max_send_wr = 0;
  uint64_t next_seq = 0;     // sequence number of the next posted WR
  uint64_t retired_seq = 0;  // WRs below this have left the send queue
  bool stalled = false;
  std::vector<std::pair<ibv_wc, uint64_t>> withheld;  // (completion, seq) held back while stalled
};

const char* state_name(ibv_qp_state s) {
  switch (s) {
    case IBV_QPS_RESET: return "RESET";
    case IBV_QPS_INIT: return "INIT";
    case IBV_QPS_RTR: return "RTR";
    case IBV_QPS_RTS: return "RTS";
    case IBV_QPS_ERR: return "ERR";
    default: return "OTHER";
  }
}

// The shared fabric: every fake object of the process, behind one lock.
struct Fabric {
  std::mutex mu;
  uint32_t next_qpn = 0x100;
  uint32_t next_key = 0x1000;
  int next_instance = 1;
  std::map<uint32_t, FakeQp*> qps;
  std::map<uint32_t, FakeMr*> mrs_by_lkey;
  std::map<uint32_t, FakeMr*> mrs_by_rkey;
  FakeStats stats;
  std::optional<std::pair<ibv_wc_status, uint64_t>> injected;
  bool stall_next = false;
};

Fabric& fabric() {
  static Fabric* f = new Fabric();  // never destroyed: engines may outlive static teardown
  return *f;
}

bool has(int mask, int bits) { return (mask & bits) == bits; }

class FakeVerbs : public Verbs {
 public:
  explicit FakeVerbs(int nics) {
    std::lock_guard lock(fabric().mu);
    instance_ = fabric().next_instance++;
    for (int i = 0; i < nics; ++i)
      names_.push_back("fake_nic" + std::to_string(instance_) + "_" + std::to_string(i));
  }
  std::string kind() const override { return "fake"; }
  std::vector<std::string> device_names() override { return names_; }

  ibv_context* open_device(const std::string& name) override {
    for (size_t i = 0; i < names_.size(); ++i) {
      if (names_[i] != name) continue;
      auto* dev = new FakeContext();
      dev->name = name;
      dev->gid.raw[0] = 0xfe;
      dev->gid.raw[1] = 0x80;
      dev->gid.raw[13] = static_cast<uint8_t>(instance_);
      dev->gid.raw[14] = static_cast<uint8_t>(instance_ >> 8);
      dev->gid.raw[15] = static_cast<uint8_t>(i);
      dev->lid = static_cast<uint16_t>(instance_ * 16 + i);
      return &dev->ctx;
    }
    errno = ENODEV;
    return nullptr;
  }
  int close_device(ibv_context* ctx) override {
    delete reinterpret_cast<FakeContext*>(ctx);
    return 0;
  }
  int query_port(ibv_context* ctx, uint8_t port, ibv_port_attr* attr) override {
    if (port != 1) return EINVAL;
    *attr = ibv_port_attr{};
    attr->state = IBV_PORT_ACTIVE;
    attr->active_mtu = IBV_MTU_4096;
    attr->max_mtu = IBV_MTU_4096;
    attr->lid = dev(ctx)->lid;
    attr->link_layer = IBV_LINK_LAYER_ETHERNET;
    attr->gid_tbl_len = 1;
    return 0;
  }
  int query_gid(ibv_context* ctx, uint8_t port, int index, ibv_gid* gid) override {
    if (port != 1 || index != 0) return EINVAL;
    *gid = dev(ctx)->gid;
    return 0;
  }
  ibv_pd* alloc_pd(ibv_context* ctx) override {
    auto* pd = new FakePd();
    pd->pd.context = ctx;
    pd->dev = dev(ctx);
    return &pd->pd;
  }
  int dealloc_pd(ibv_pd* pd) override {
    delete reinterpret_cast<FakePd*>(pd);
    return 0;
  }
  ibv_mr* reg_mr(ibv_pd* pd, void* addr, size_t length, int access) override {
    auto* mr = new FakeMr();
    mr->pd = reinterpret_cast<FakePd*>(pd);
    mr->access = access;
    mr->mr.context = pd->context;
    mr->mr.pd = pd;
    mr->mr.addr = addr;
    mr->mr.length = length;
    std::lock_guard lock(fabric().mu);
    mr->mr.lkey = fabric().next_key++;
    mr->mr.rkey = fabric().next_key++;
    fabric().mrs_by_lkey[mr->mr.lkey] = mr;
    fabric().mrs_by_rkey[mr->mr.rkey] = mr;
    return &mr->mr;
  }
  int dereg_mr(ibv_mr* mr) override {
    std::lock_guard lock(fabric().mu);
    fabric().mrs_by_lkey.erase(mr->lkey);
    fabric().mrs_by_rkey.erase(mr->rkey);
    delete reinterpret_cast<FakeMr*>(mr);
    return 0;
  }
  ibv_cq* create_cq(ibv_context* ctx, int cqe) override {
    auto* cq = new FakeCq();
    cq->cq.context = ctx;
    cq->cq.cqe = cqe;
    cq->capacity = cqe;
    return &cq->cq;
  }
  int destroy_cq(ibv_cq* cq) override {
    std::lock_guard lock(fabric().mu);
    delete reinterpret_cast<FakeCq*>(cq);
    return 0;
  }
  ibv_qp* create_qp(ibv_pd* pd, ibv_qp_init_attr* attr) override {
    if (attr->qp_type != IBV_QPT_RC || !attr->send_cq || attr->cap.max_send_wr == 0) {
      errno = EINVAL;
      return nullptr;
    }
    auto* qp = new FakeQp();
    qp->pd = reinterpret_cast<FakePd*>(pd);
    qp->send_cq = reinterpret_cast<FakeCq*>(attr->send_cq);
    qp->max_send_wr = attr->cap.max_send_wr;
    qp->qp.context = pd->context;
    qp->qp.pd = pd;
    qp->qp.send_cq = attr->send_cq;
    qp->qp.qp_type = IBV_QPT_RC;
    qp->qp.state = IBV_QPS_RESET;
    std::lock_guard lock(fabric().mu);
    qp->qp.qp_num = fabric().next_qpn++;
    fabric().qps[qp->qp.qp_num] = qp;
    return &qp->qp;
  }
  int modify_qp(ibv_qp* ibqp, ibv_qp_attr* attr, int mask) override {
    std::lock_guard lock(fabric().mu);
    FakeQp* qp = reinterpret_cast<FakeQp*>(ibqp);
    if (!(mask & IBV_QP_STATE)) return EINVAL;
    ibv_qp_state from = qp->state, to = attr->qp_state;
    bool ok = false;
    if (to == IBV_QPS_ERR || to == IBV_QPS_RESET) {
      ok = true;
    } else if (from == IBV_QPS_RESET && to == IBV_QPS_INIT) {
      ok = has(mask, IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS) && attr->port_num == 1;
    } else if (from == IBV_QPS_INIT && to == IBV_QPS_RTR) {
      ok = has(mask, IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                         IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
      if (ok) {
        qp->dest_qpn = attr->dest_qp_num;
        qp->dgid = attr->ah_attr.grh.dgid;
      }
    } else if (from == IBV_QPS_RTR && to == IBV_QPS_RTS) {
      ok = has(mask, IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                         IBV_QP_MAX_QP_RD_ATOMIC);
    }
    if (!ok) return EINVAL;
    if (to == IBV_QPS_ERR) {
      // Work the QP was still holding is flushed, each WR with its own completion.
      for (auto& [wc, seq] : qp->withheld) {
        wc.status = IBV_WC_WR_FLUSH_ERR;
        qp->send_cq->entries.push_back({wc, qp, seq});
      }
      qp->withheld.clear();
      qp->stalled = false;
    }
    qp->state = to;
    qp->qp.state = to;
    fabric().stats.qp_transitions.push_back(std::to_string(qp->qp.qp_num) + ":" +
                                            state_name(from) + "->" + state_name(to));
    return 0;
  }
  int destroy_qp(ibv_qp* ibqp) override {
    std::lock_guard lock(fabric().mu);
    FakeQp* qp = reinterpret_cast<FakeQp*>(ibqp);
    fabric().qps.erase(ibqp->qp_num);
    // Completions of a destroyed QP must not point at it any more.
    auto& entries = qp->send_cq->entries;
    for (auto& e : entries)
      if (e.qp == qp) e.qp = nullptr;
    delete qp;
    return 0;
  }

  int post_send(ibv_qp* ibqp, ibv_send_wr* wr, ibv_send_wr** bad_wr) override {
    std::lock_guard lock(fabric().mu);
    Fabric& f = fabric();
    FakeQp* qp = reinterpret_cast<FakeQp*>(ibqp);
    ++f.stats.post_send_calls;
    if (qp->state != IBV_QPS_RTS && qp->state != IBV_QPS_ERR) {
      *bad_wr = wr;
      return EINVAL;
    }
    size_t chain = 0;
    for (ibv_send_wr* w = wr; w; w = w->next) ++chain;
    uint64_t outstanding = qp->next_seq - qp->retired_seq;
    if (outstanding + chain > qp->max_send_wr) {
      ++f.stats.send_queue_full;
      *bad_wr = wr;
      return ENOMEM;
    }
    f.stats.max_outstanding = std::max<uint64_t>(f.stats.max_outstanding, outstanding + chain);
    for (ibv_send_wr* w = wr; w; w = w->next) {
      uint64_t seq = qp->next_seq++;
      ++f.stats.wrs_posted;
      bool signaled = w->send_flags & IBV_SEND_SIGNALED;
      if (signaled) ++f.stats.wrs_signaled;
      if (f.stall_next && qp->state == IBV_QPS_RTS) {
        f.stall_next = false;
        qp->stalled = true;
      }
      if (qp->stalled) {
        ibv_wc wc{};
        wc.wr_id = w->wr_id;
        wc.opcode = w->opcode == IBV_WR_RDMA_READ ? IBV_WC_RDMA_READ : IBV_WC_RDMA_WRITE;
        wc.qp_num = qp->qp.qp_num;
        qp->withheld.push_back({wc, seq});
        continue;
      }
      ibv_wc_status status = qp->state == IBV_QPS_ERR ? IBV_WC_WR_FLUSH_ERR : execute(qp, w);
      if (status != IBV_WC_SUCCESS && qp->state != IBV_QPS_ERR) {
        qp->state = IBV_QPS_ERR;
        qp->qp.state = IBV_QPS_ERR;
        f.stats.qp_transitions.push_back(std::to_string(qp->qp.qp_num) + ":RTS->ERR");
      }
      if (signaled || status != IBV_WC_SUCCESS) {
        ibv_wc wc{};
        wc.wr_id = w->wr_id;
        wc.status = status;
        wc.opcode = w->opcode == IBV_WR_RDMA_READ ? IBV_WC_RDMA_READ : IBV_WC_RDMA_WRITE;
        wc.qp_num = qp->qp.qp_num;
        wc.vendor_err = status == IBV_WC_SUCCESS ? 0 : 0x42;
        if (static_cast<int>(qp->send_cq->entries.size()) >= qp->send_cq->capacity)
          ++f.stats.cq_overflows;
        qp->send_cq->entries.push_back({wc, qp, seq});
      }
    }
    return 0;
  }

  int poll_cq(ibv_cq* ibcq, int entries, ibv_wc* wc) override {
    std::lock_guard lock(fabric().mu);
    FakeCq* cq = reinterpret_cast<FakeCq*>(ibcq);
    int n = 0;
    while (n < entries && !cq->entries.empty()) {
      FakeCqe e = cq->entries.front();
      cq->entries.pop_front();
      // A completion frees its WR's send-queue slot and every earlier one (RC ordering).
      if (e.qp && e.qp->retired_seq <= e.seq) e.qp->retired_seq = e.seq + 1;
      wc[n++] = e.wc;
      ++fabric().stats.completions;
      if (e.wc.status != IBV_WC_SUCCESS) ++fabric().stats.error_completions;
    }
    return n;
  }

 private:
  static FakeContext* dev(ibv_context* ctx) { return reinterpret_cast<FakeContext*>(ctx); }

  // Runs one WR; called with the fabric lock held.
  static ibv_wc_status execute(FakeQp* qp, ibv_send_wr* w) {
    Fabric& f = fabric();
    if (f.injected) {
      if (f.injected->second == 0) {
        ibv_wc_status status = f.injected->first;
        f.injected.reset();
        return status;
      }
      --f.injected->second;
    }
    if (w->opcode != IBV_WR_RDMA_WRITE && w->opcode != IBV_WR_RDMA_READ) return IBV_WC_LOC_QP_OP_ERR;
    auto peer = f.qps.find(qp->dest_qpn);
    if (peer == f.qps.end() || peer->second->state < IBV_QPS_RTR ||
        peer->second->state == IBV_QPS_ERR ||
        std::memcmp(peer->second->pd->dev->gid.raw, qp->dgid.raw, 16) != 0)
      return IBV_WC_RETRY_EXC_ERR;  // nobody answers at that address
    uint64_t length = 0;
    for (int i = 0; i < w->num_sge; ++i) length += w->sg_list[i].length;
    auto rmr = f.mrs_by_rkey.find(w->wr.rdma.rkey);
    int need = w->opcode == IBV_WR_RDMA_WRITE ? IBV_ACCESS_REMOTE_WRITE : IBV_ACCESS_REMOTE_READ;
    uint64_t raddr = w->wr.rdma.remote_addr;
    if (rmr == f.mrs_by_rkey.end() || rmr->second->pd != peer->second->pd ||
        !(rmr->second->access & need) ||
        raddr < reinterpret_cast<uint64_t>(rmr->second->mr.addr) ||
        raddr + length > reinterpret_cast<uint64_t>(rmr->second->mr.addr) + rmr->second->mr.length)
      return IBV_WC_REM_ACCESS_ERR;
    for (int i = 0; i < w->num_sge; ++i) {
      const ibv_sge& sge = w->sg_list[i];
      auto lmr = f.mrs_by_lkey.find(sge.lkey);
      if (lmr == f.mrs_by_lkey.end() || lmr->second->pd != qp->pd ||
          sge.addr < reinterpret_cast<uint64_t>(lmr->second->mr.addr) ||
          sge.addr + sge.length >
              reinterpret_cast<uint64_t>(lmr->second->mr.addr) + lmr->second->mr.length)
        return IBV_WC_LOC_PROT_ERR;
    }
    for (int i = 0; i < w->num_sge; ++i) {
      const ibv_sge& sge = w->sg_list[i];
      void* local = reinterpret_cast<void*>(sge.addr);
      void* remote = reinterpret_cast<void*>(raddr);
      if (w->opcode == IBV_WR_RDMA_WRITE)
        std::memcpy(remote, local, sge.length);
      else
        std::memcpy(local, remote, sge.length);
      raddr += sge.length;
    }
    f.stats.bytes_by_device[qp->pd->dev->name] += length;
    ++f.stats.wrs_by_device[qp->pd->dev->name];
    f.stats.wr_lengths.push_back(length);
    return IBV_WC_SUCCESS;
  }

  int instance_ = 0;
  std::vector<std::string> names_;
};

}  // namespace

std::unique_ptr<Verbs> make_fake_verbs(int nics) { return std::make_unique<FakeVerbs>(nics); }

FakeStats fake_stats() {
  std::lock_guard lock(fabric().mu);
  return fabric().stats;
}

void fake_reset_stats() {
  std::lock_guard lock(fabric().mu);
  fabric().stats = FakeStats{};
  fabric().injected.reset();
  fabric().stall_next = false;
}

void fake_inject_stall() {
  std::lock_guard lock(fabric().mu);
  fabric().stall_next = true;
}

void fake_inject_error(ibv_wc_status status, uint64_t after_wrs) {
  std::lock_guard lock(fabric().mu);
  fabric().injected = std::make_pair(status, after_wrs);
}

}  // namespace mooncake_vllm::rdma

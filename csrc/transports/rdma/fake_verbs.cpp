#include "fake_verbs.h"

#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>

namespace mooncake_vllm::rdma {

namespace {

constexpr int kGidTableLength = 4;

struct FakeContext {
  ibv_context ctx{};
  std::string name;
  // A RoCE GID table: 0 link-local v1, 1 link-local v2, 2 IPv4-mapped v1, 3 IPv4-mapped v2
  // (as on a NIC, the v1 and v2 entries of one address hold the same GID).
  ibv_gid gids[kGidTableLength]{};
  uint16_t lid = 0;
  FakeConfig config;
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
// A posted WR the NIC has not executed yet: a copy, since the poster's memory for it is gone
// once post_send returns.
struct Held {
  ibv_wc wc;
  uint64_t seq;
  ibv_send_wr wr;
  std::vector<ibv_sge> sges;
};
Held hold(ibv_send_wr* w, uint64_t seq, uint32_t qp_num) {
  Held h{};
  h.wc.wr_id = w->wr_id;
  h.wc.opcode = w->opcode == IBV_WR_RDMA_READ ? IBV_WC_RDMA_READ : IBV_WC_RDMA_WRITE;
  h.wc.qp_num = qp_num;
  h.seq = seq;
  h.wr = *w;
  h.sges.assign(w->sg_list, w->sg_list + w->num_sge);
  h.wr.next = nullptr;
  return h;
}

struct FakeQp {
  ibv_qp qp{};
  FakePd* pd = nullptr;
  FakeCq* send_cq = nullptr;
  ibv_qp_state state = IBV_QPS_RESET;
  uint32_t dest_qpn = 0;
  ibv_gid dgid{};
  ibv_gid sgid{};  // ours, as chosen by sgid_index at RTR
  uint32_t rq_psn = 0, sq_psn = 0;
  uint8_t port = 0;
  uint32_t max_send_wr = 0;
  uint64_t next_seq = 0;     // sequence number of the next posted WR
  uint64_t retired_seq = 0;  // WRs below this have left the send queue
  bool stalled = false;
  std::vector<Held> withheld;  // work held back while stalled, in order
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
  std::optional<uint32_t> partial_post;
  FakeConfig config;
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
      for (int g = 0; g < kGidTableLength; ++g) {
        ibv_gid& gid = dev->gids[g];
        if (g < 2) {
          gid.raw[0] = 0xfe;
          gid.raw[1] = 0x80;
        } else {
          gid.raw[10] = gid.raw[11] = 0xff;
          gid.raw[12] = 10;
        }
        gid.raw[13] = static_cast<uint8_t>(instance_);
        gid.raw[14] = static_cast<uint8_t>(instance_ >> 8);
        gid.raw[15] = static_cast<uint8_t>(i);
      }
      dev->lid = static_cast<uint16_t>(instance_ * 16 + i);
      {
        std::lock_guard lock(fabric().mu);
        dev->config = fabric().config;
      }
      return &dev->ctx;
    }
    errno = ENODEV;
    return nullptr;
  }
  int close_device(ibv_context* ctx) override {
    delete reinterpret_cast<FakeContext*>(ctx);
    return 0;
  }
  int query_device(ibv_context* ctx, ibv_device_attr* attr) override {
    *attr = ibv_device_attr{};
    attr->phys_port_cnt = static_cast<uint8_t>(dev(ctx)->config.ports);
    attr->max_qp_wr = 16384;
    attr->max_cqe = 65536;
    return 0;
  }
  int query_port(ibv_context* ctx, uint8_t port, ibv_port_attr* attr) override {
    const FakeConfig& config = dev(ctx)->config;
    if (port < 1 || port > config.ports) return EINVAL;
    *attr = ibv_port_attr{};
    attr->state = port == config.active_port ? IBV_PORT_ACTIVE : IBV_PORT_DOWN;
    attr->active_mtu = config.active_mtu;
    attr->max_mtu = IBV_MTU_4096;
    attr->lid = dev(ctx)->lid;
    attr->link_layer = IBV_LINK_LAYER_ETHERNET;
    attr->gid_tbl_len = kGidTableLength;
    return 0;
  }
  int query_gid(ibv_context* ctx, uint8_t port, int index, ibv_gid* gid) override {
    if (port < 1 || port > dev(ctx)->config.ports || index < 0 || index >= kGidTableLength)
      return EINVAL;
    *gid = dev(ctx)->gids[index];
    return 0;
  }
  int query_gid_type(ibv_context* ctx, uint8_t port, int index, ibv_gid_type* type) override {
    if (port < 1 || port > dev(ctx)->config.ports || index < 0 || index >= kGidTableLength)
      return EINVAL;
    *type = index % 2 ? IBV_GID_TYPE_ROCE_V2 : IBV_GID_TYPE_ROCE_V1;
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
    ++fabric().stats.live_qps;
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
      // Only an ACTIVE port carries traffic.
      ok = has(mask, IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS) &&
           attr->port_num == qp->pd->dev->config.active_port;
      if (ok) qp->port = attr->port_num;
    } else if (from == IBV_QPS_INIT && to == IBV_QPS_RTR) {
      const ibv_ah_attr& ah = attr->ah_attr;
      ok = has(mask, IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                         IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER) &&
           ah.port_num == qp->port && ah.grh.sgid_index < kGidTableLength &&
           attr->path_mtu <= qp->pd->dev->config.active_mtu;
      if (ok) {
        qp->dest_qpn = attr->dest_qp_num;
        qp->dgid = ah.grh.dgid;
        qp->sgid = qp->pd->dev->gids[ah.grh.sgid_index];
        qp->rq_psn = attr->rq_psn;
        auto& rec = fabric().stats.qp_attrs[qp->qp.qp_num];
        rec["port"] = ah.port_num;
        rec["sgid_index"] = ah.grh.sgid_index;
        rec["hop_limit"] = ah.grh.hop_limit;
        rec["path_mtu"] = attr->path_mtu;
        rec["rq_psn"] = attr->rq_psn;
      }
    } else if (from == IBV_QPS_RTR && to == IBV_QPS_RTS) {
      ok = has(mask, IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                         IBV_QP_MAX_QP_RD_ATOMIC);
      if (ok) {
        qp->sq_psn = attr->sq_psn;
        fabric().stats.qp_attrs[qp->qp.qp_num]["sq_psn"] = attr->sq_psn;
      }
    }
    if (!ok) return EINVAL;
    if (to == IBV_QPS_ERR) {
      // Work the QP was still holding is flushed, each WR with its own completion.
      for (auto& held : qp->withheld) {
        held.wc.status = IBV_WC_WR_FLUSH_ERR;
        qp->send_cq->entries.push_back({held.wc, qp, held.seq});
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
    --fabric().stats.live_qps;
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
    size_t take = chain;
    if (f.partial_post && chain > *f.partial_post) {
      take = *f.partial_post;
      f.partial_post.reset();
    }
    uint64_t on_cq = take;
    for (auto& [qpn, other] : f.qps)
      if (other->send_cq == qp->send_cq) on_cq += other->next_seq - other->retired_seq;
    f.stats.max_cq_outstanding = std::max(f.stats.max_cq_outstanding, on_cq);
    size_t index = 0;
    for (ibv_send_wr* w = wr; w; w = w->next, ++index) {
      if (index == take) {
        // The rest is refused; what was taken waits in the send queue like stalled work.
        *bad_wr = w;
        qp->stalled = qp->stalled || take > 0;
        return ENOMEM;
      }
      if (take < chain) {
        ++f.stats.wrs_posted;
        qp->withheld.push_back(hold(w, qp->next_seq++, qp->qp.qp_num));
        continue;
      }
      uint64_t seq = qp->next_seq++;
      ++f.stats.wrs_posted;
      bool signaled = w->send_flags & IBV_SEND_SIGNALED;
      if (signaled) ++f.stats.wrs_signaled;
      if (f.stall_next && qp->state == IBV_QPS_RTS) {
        f.stall_next = false;
        qp->stalled = true;
      }
      if (qp->stalled) {
        qp->withheld.push_back(hold(w, seq, qp->qp.qp_num));
        continue;
      }
      run(qp, w, seq);
    }
    return 0;
  }

  // Executes one WR and queues its completion (signalled or failed); fabric lock held.
  static void run(FakeQp* qp, ibv_send_wr* w, uint64_t seq) {
    Fabric& f = fabric();
    bool signaled = w->send_flags & IBV_SEND_SIGNALED;
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

 public:
  static void release_all() {
    Fabric& f = fabric();
    for (auto& [qpn, qp] : f.qps) {
      if (!qp->stalled) continue;
      qp->stalled = false;
      std::vector<Held> held;
      held.swap(qp->withheld);
      for (auto& h : held) {
        h.wr.sg_list = h.sges.data();
        run(qp, &h.wr, h.seq);
      }
    }
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
        std::memcmp(peer->second->sgid.raw, qp->dgid.raw, 16) != 0)
      return IBV_WC_RETRY_EXC_ERR;  // nobody answers at that address
    // The responder expects our first PSN; a mismatch is a sequence error the requester
    // retries until it gives up.
    if (peer->second->rq_psn != qp->sq_psn) return IBV_WC_RETRY_EXC_ERR;
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
  fabric().partial_post.reset();
  fabric().config = FakeConfig{};
}

void fake_inject_stall() {
  std::lock_guard lock(fabric().mu);
  fabric().stall_next = true;
}

void fake_release_stall() {
  std::lock_guard lock(fabric().mu);
  fabric().stall_next = false;
  FakeVerbs::release_all();
}

void fake_inject_partial_post(uint32_t posted) {
  std::lock_guard lock(fabric().mu);
  fabric().partial_post = posted;
}

void fake_configure(const FakeConfig& config) {
  std::lock_guard lock(fabric().mu);
  fabric().config = config;
}

void fake_inject_error(ibv_wc_status status, uint64_t after_wrs) {
  std::lock_guard lock(fabric().mu);
  fabric().injected = std::make_pair(status, after_wrs);
}

}  // namespace mooncake_vllm::rdma

// The thin seam between the RDMA transport and libibverbs. Every ibv_* call the transport makes
// goes through this interface, so that the transport's own logic (slicing, striping, WR
// chains, completion accounting, QP state machine, error mapping) runs unchanged against
// FakeVerbs, a software NIC, on machines without RDMA hardware.
#pragma once

#include <infiniband/verbs.h>

#include <memory>
#include <string>
#include <vector>

namespace mooncake_vllm::rdma {

class Verbs {
 public:
  virtual ~Verbs() = default;
  virtual std::string kind() const = 0;  // "ibverbs" | "fake"
  virtual std::vector<std::string> device_names() = 0;
  virtual ibv_context* open_device(const std::string& name) = 0;  // nullptr + errno on failure
  virtual int close_device(ibv_context* ctx) = 0;
  virtual int query_device(ibv_context* ctx, ibv_device_attr* attr) = 0;
  virtual int query_port(ibv_context* ctx, uint8_t port, ibv_port_attr* attr) = 0;
  virtual int query_gid(ibv_context* ctx, uint8_t port, int index, ibv_gid* gid) = 0;
  // RoCE v1 / v2 / IB of one GID table entry.
  virtual int query_gid_type(ibv_context* ctx, uint8_t port, int index, ibv_gid_type* type) = 0;
  virtual ibv_pd* alloc_pd(ibv_context* ctx) = 0;
  virtual int dealloc_pd(ibv_pd* pd) = 0;
  virtual ibv_mr* reg_mr(ibv_pd* pd, void* addr, size_t length, int access) = 0;
  virtual int dereg_mr(ibv_mr* mr) = 0;
  virtual ibv_cq* create_cq(ibv_context* ctx, int cqe) = 0;
  virtual int destroy_cq(ibv_cq* cq) = 0;
  virtual ibv_qp* create_qp(ibv_pd* pd, ibv_qp_init_attr* attr) = 0;
  virtual int modify_qp(ibv_qp* qp, ibv_qp_attr* attr, int mask) = 0;
  virtual int destroy_qp(ibv_qp* qp) = 0;
  virtual int post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr) = 0;
  virtual int poll_cq(ibv_cq* cq, int entries, ibv_wc* wc) = 0;
};

// The real thing (ibverbs_verbs.cpp).
std::unique_ptr<Verbs> make_ibverbs();

}  // namespace mooncake_vllm::rdma

// Verbs backed by libibverbs: each method is the ibv_* call of the same name.
#include "verbs.h"

namespace mooncake_vllm::rdma {

namespace {

class IbVerbs : public Verbs {
 public:
  std::string kind() const override { return "ibverbs"; }
  std::vector<std::string> device_names() override {
    std::vector<std::string> names;
    int count = 0;
    ibv_device** list = ibv_get_device_list(&count);
    if (!list) return names;
    for (int i = 0; i < count; ++i) names.emplace_back(ibv_get_device_name(list[i]));
    ibv_free_device_list(list);
    return names;
  }
  ibv_context* open_device(const std::string& name) override {
    int count = 0;
    ibv_device** list = ibv_get_device_list(&count);
    if (!list) return nullptr;
    ibv_context* ctx = nullptr;
    for (int i = 0; i < count && !ctx; ++i)
      if (name == ibv_get_device_name(list[i])) ctx = ibv_open_device(list[i]);
    ibv_free_device_list(list);
    return ctx;
  }
  int close_device(ibv_context* ctx) override { return ibv_close_device(ctx); }
  int query_port(ibv_context* ctx, uint8_t port, ibv_port_attr* attr) override {
    return ibv_query_port(ctx, port, attr);
  }
  int query_device(ibv_context* ctx, ibv_device_attr* attr) override {
    return ibv_query_device(ctx, attr);
  }
  int query_gid(ibv_context* ctx, uint8_t port, int index, ibv_gid* gid) override {
    return ibv_query_gid(ctx, port, index, gid);
  }
  int query_gid_type(ibv_context* ctx, uint8_t port, int index, ibv_gid_type* type) override {
    ibv_gid_entry entry{};
    if (int rc = ibv_query_gid_ex(ctx, port, static_cast<uint32_t>(index), &entry, 0)) return rc;
    *type = static_cast<ibv_gid_type>(entry.gid_type);
    return 0;
  }
  ibv_pd* alloc_pd(ibv_context* ctx) override { return ibv_alloc_pd(ctx); }
  int dealloc_pd(ibv_pd* pd) override { return ibv_dealloc_pd(pd); }
  ibv_mr* reg_mr(ibv_pd* pd, void* addr, size_t length, int access) override {
    return ibv_reg_mr(pd, addr, length, access);
  }
  int dereg_mr(ibv_mr* mr) override { return ibv_dereg_mr(mr); }
  ibv_cq* create_cq(ibv_context* ctx, int cqe) override {
    return ibv_create_cq(ctx, cqe, nullptr, nullptr, 0);
  }
  int destroy_cq(ibv_cq* cq) override { return ibv_destroy_cq(cq); }
  ibv_qp* create_qp(ibv_pd* pd, ibv_qp_init_attr* attr) override { return ibv_create_qp(pd, attr); }
  int modify_qp(ibv_qp* qp, ibv_qp_attr* attr, int mask) override {
    return ibv_modify_qp(qp, attr, mask);
  }
  int destroy_qp(ibv_qp* qp) override { return ibv_destroy_qp(qp); }
  int post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr) override {
    return ibv_post_send(qp, wr, bad_wr);
  }
  int poll_cq(ibv_cq* cq, int entries, ibv_wc* wc) override { return ibv_poll_cq(cq, entries, wc); }
};

}  // namespace

std::unique_ptr<Verbs> make_ibverbs() { return std::make_unique<IbVerbs>(); }

}  // namespace mooncake_vllm::rdma

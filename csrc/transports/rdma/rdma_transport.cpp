#include "rdma_transport.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "device.h"
#include "fake_verbs.h"
#include "handshake.h"
#include "lanes.h"
#include "mooncake_vllm/log.h"
#include "mooncake_vllm/request_planner.h"
#include "transports/common/frames.h"
#include "transports/common/listener.h"
#include "transports/common/threads.h"
#include "verbs.h"

namespace mooncake_vllm::rdma {

namespace {

// QPs this engine answers handshakes with, over all requesters together.
constexpr size_t kMaxPassiveQps = 1024;
// An MR allows remote READ only when its region was registered with remote_read (the NIC then
// refuses a READ of any other region with a remote access error).
int mr_access(const Region& region) {
  return IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
         (region.remote_read ? IBV_ACCESS_REMOTE_READ : 0);
}

std::unique_ptr<Verbs> make_verbs(const EngineConfig& config) {
  if (config.verbs == "fake") return make_fake_verbs(config.fake_nics);
  if (config.verbs == "ibverbs") return make_ibverbs();
  throw InvalidArgument("verbs must be 'ibverbs' or 'fake' (the software test double), not '" +
                        config.verbs + "'");
}

std::vector<std::string> select_devices(Verbs& verbs, const EngineConfig& config) {
  std::vector<std::string> all = verbs.device_names(), chosen;
  for (const auto& name : all)
    if (config.rdma_devices.empty() ||
        std::find(config.rdma_devices.begin(), config.rdma_devices.end(), name) !=
            config.rdma_devices.end())
      chosen.push_back(name);
  return chosen;
}

// Whether a new version of a peer's descriptor needs new QPs. A peer re-publishes its
// descriptor whenever it registers memory (a region more, same QPs on its side): that keeps
// the live QPs. A changed address (endpoint, device GIDs/LIDs), or a region still there with
// other rkeys (the peer restarted and registered it anew, so its QPs are gone too), does not.
bool needs_new_qps(const SegmentDescriptor& old, const SegmentDescriptor& now) {
  if (old.endpoint != now.endpoint || old.rdma_devices.size() != now.rdma_devices.size())
    return true;
  for (size_t i = 0; i < now.rdma_devices.size(); ++i)
    if (old.rdma_devices[i].gid != now.rdma_devices[i].gid ||
        old.rdma_devices[i].lid != now.rdma_devices[i].lid ||
        old.rdma_devices[i].name != now.rdma_devices[i].name)
      return true;
  bool common = false;
  for (size_t i = 0; i < now.regions.size(); ++i)
    for (size_t j = 0; j < old.regions.size(); ++j)
      if (now.regions[i] == old.regions[j]) {
        common = true;
        if (i < now.rkeys.size() && j < old.rkeys.size() && now.rkeys[i] != old.rkeys[j])
          return true;
      }
  return !common && !now.regions.empty() && !old.regions.empty();
}

class RdmaTransport : public Transport {
 public:
  RdmaTransport(RegionRegistry& registry, const EngineConfig& config)
      : registry_(registry),
        config_(config),
        verbs_(make_verbs(config)),
        server_(net::listener_options(config)) {
    if (config_.rdma_slice_bytes == 0) throw InvalidArgument("rdma_slice_bytes must be > 0");
    if (config_.rdma_signal_every < 1 || config_.rdma_signal_every > int(kMaxSendWr))
      throw InvalidArgument("rdma_signal_every must be in 1..256");
    if (config_.rdma_cq_depth < int(kMaxSendWr))
      throw InvalidArgument("rdma_cq_depth must be >= " + std::to_string(kMaxSendWr));
    auto names = select_devices(*verbs_, config);
    if (names.empty()) throw TransferError("no RDMA device matches " + device_filter());
    if (names.size() > kMaxQpsPerPeer) names.resize(kMaxQpsPerPeer);
    for (const auto& name : names)
      devices_.push_back(
          std::make_unique<Device>(*verbs_, static_cast<int>(devices_.size()), name, config_));
    server_.set_control_handler([this](const std::string& blob, const std::string& peer_host) {
      return accept_qps(blob, peer_host);
    });
  }

  ~RdmaTransport() override { stop(); }

  std::string name() const override { return "rdma"; }

  std::string start() override {
    uint16_t port = server_.start();
    poller_ = net::start_thread("the RDMA completion poller", [this] { poll_loop(); });
    endpoint_ = config_.hostname + ":" + std::to_string(port);
    return endpoint_;
  }

  void describe(SegmentDescriptor& desc) override {
    for (const auto& dev : devices_)
      desc.rdma_devices.push_back({dev->name, gid_to_hex(dev->gid), dev->lid, dev->port});
  }

  void on_register(Region& region) override {
    for (const auto& dev : devices_) {
      ibv_mr* mr = verbs_->reg_mr(dev->pd, reinterpret_cast<void*>(region.addr), region.length,
                                  mr_access(region));
      if (!mr) {
        int err = errno;
        on_unregister(region);
        throw TransferError(
            sys_error("ibv_reg_mr of " + hex_addr(region.addr) + " on " + dev->name, err));
      }
      region.mrs.push_back(mr);
      region.lkeys.push_back(mr->lkey);
      region.rkeys.push_back(mr->rkey);
    }
  }

  void on_unregister(const Region& region) override {
    for (void* mr : region.mrs) verbs_->dereg_mr(static_cast<ibv_mr*>(mr));
  }

  void open_peer(const std::shared_ptr<const Peer>& peer) override {
    if (peer->desc.rdma_devices.empty())
      throw InvalidArgument("segment '" + peer->desc.name + "' lists no RDMA devices");
    std::shared_ptr<PeerState> state;
    {
      std::lock_guard lock(mu_);
      auto& slot = peers_[peer->handle];
      if (!slot) slot = std::make_shared<PeerState>();
      state = slot;
    }
    // Segments are re-opened whenever the peer registers memory: that must not disturb QPs
    // with batches in flight (moving them to ERR would flush those batches). Only a peer that
    // needs new QPs (needs_new_qps) makes the next batch reconnect.
    std::lock_guard peer_lock(state->mu);
    bool renew = !state->opened || needs_new_qps(state->desc, peer->desc);
    state->opened = true;
    state->desc = peer->desc;
    if (!renew) return;
    state->connected = false;
    ++state->generation;
  }

  void submit(const std::shared_ptr<const Peer>& peer, const std::shared_ptr<Batch>& batch,
              std::vector<Request> requests) override {
    std::shared_ptr<PeerState> state;
    {
      std::lock_guard lock(mu_);
      if (stopped_) throw TransferError("engine closed");
      state = peers_.at(peer->handle);
    }
    std::vector<std::shared_ptr<Lane>> lanes;
    try {
      lanes = connected_lanes(*peer, state);
    } catch (const std::exception& e) {
      batch->set_parts(1);
      batch->part_done(false, e.what());
      return;
    }
    post_batch(*peer, state, lanes, batch, coalesce_adjacent(requests));
  }

  void stop() override {
    {
      std::lock_guard lock(mu_);
      if (stopped_) return;
      stopped_ = true;
    }
    server_.stop();
    std::vector<std::shared_ptr<Lane>> lanes;
    {
      std::lock_guard lock(mu_);
      for (auto& [handle, state] : peers_) {
        std::lock_guard peer_lock(state->mu);
        lanes.insert(lanes.end(), state->lanes.begin(), state->lanes.end());
      }
      for (auto& [key, lane] : passive_) lanes.push_back(lane);
      passive_.clear();
      peers_.clear();
    }
    for (auto& lane : lanes) lane_to_error(*verbs_, *lane);
    // Let the poller retire the flushed chains (their leases and records) before it stops.
    auto deadline = Clock::now() + std::chrono::seconds(2);
    for (auto& lane : lanes) {
      std::unique_lock lane_lock(lane->mu);
      lane->cv.wait_until(lane_lock, deadline, [&] { return lane->chains_in_flight == 0; });
    }
    stop_poller_.store(true);
    if (poller_.joinable()) poller_.join();
    {
      std::lock_guard lock(retired_mu_);
      lanes.insert(lanes.end(), retired_.begin(), retired_.end());
      retired_.clear();
    }
    for (auto& lane : lanes) destroy_lane(*verbs_, *lane);
    for (const auto& region : registry_.snapshot()) on_unregister(*region);
    devices_.clear();
  }

 private:
  std::string device_filter() const {
    if (config_.rdma_devices.empty()) return "(any device)";
    std::string names;
    for (const auto& n : config_.rdma_devices) names += (names.empty() ? "" : ",") + n;
    return "rdma_devices=[" + names + "]";
  }

  // Responder side of the handshake (called by the listener only on an authenticated
  // connection): one QP per requested lane, paired and brought to RTS. Either every QP of the
  // request is made, or none is left behind. QPs are kept under the address the request came
  // from as well as the requester's name, so that no peer can replace another host's QPs by
  // claiming its name.
  std::string accept_qps(const std::string& blob, const std::string& peer_host) {
    HandshakeRequest request = decode_request(blob);  // at most kMaxQpsPerPeer QPs
    auto key_of = [&](int lane) {
      return peer_host + "|" + request.requester + "#" + std::to_string(lane);
    };
    for (const auto& want : request.qps)
      if (want.device < 0 || want.device >= static_cast<int>(devices_.size()))
        throw TransferError("RDMA handshake asks for device " + std::to_string(want.device) +
                            " but this engine has " + std::to_string(devices_.size()));
    {
      std::lock_guard lock(mu_);
      size_t replaced = 0;
      for (const auto& want : request.qps) replaced += passive_.count(key_of(want.lane));
      if (passive_.size() - replaced + request.qps.size() > kMaxPassiveQps)
        throw TransferError("this engine already answers " + std::to_string(passive_.size()) +
                            " queue pairs (limit " + std::to_string(kMaxPassiveQps) + ")");
    }
    std::vector<QpEndpoint> reply;
    std::vector<std::shared_ptr<Lane>> created;
    try {
      for (const auto& want : request.qps) {
        created.push_back(create_lane(*verbs_, devices_[want.device].get(), 0));
        connect_lane(*verbs_, *created.back(), want);
        reply.push_back(endpoint_of(*created.back(), want.lane, want.device));
      }
    } catch (...) {
      for (auto& lane : created) destroy_lane(*verbs_, *lane);  // no work was ever posted on them
      throw;
    }
    std::vector<std::shared_ptr<Lane>> replaced;
    {
      std::lock_guard lock(mu_);
      // The cap again, under the lock that inserts: handshakes running at once all passed
      // the first check.
      size_t kept = 0;
      for (const auto& want : request.qps) kept += passive_.count(key_of(want.lane));
      bool full = passive_.size() - kept + created.size() > kMaxPassiveQps;
      if (stopped_ || full) {
        for (auto& lane : created) destroy_lane(*verbs_, *lane);
        throw TransferError(stopped_ ? std::string("engine closed")
                                     : "this engine already answers " +
                                           std::to_string(passive_.size()) +
                                           " queue pairs (limit " +
                                           std::to_string(kMaxPassiveQps) + ")");
      }
      for (size_t i = 0; i < created.size(); ++i) {
        auto& slot = passive_[key_of(request.qps[i].lane)];
        if (slot) replaced.push_back(slot);
        slot = created[i];
      }
    }
    for (auto& lane : replaced) retire_lane(lane);
    return encode_reply(reply);
  }

  // An old QP is moved to ERR (flushing its work) and destroyed once it has no chain left.
  void retire_lane(const std::shared_ptr<Lane>& lane) {
    lane_to_error(*verbs_, *lane);
    std::lock_guard lock(retired_mu_);  // a leaf lock
    retired_.push_back(lane);
  }

  std::vector<std::shared_ptr<Lane>> connected_lanes(const Peer& peer,
                                                     const std::shared_ptr<PeerState>& state) {
    {
      std::lock_guard lock(state->mu);
      if (state->connected) return state->lanes;
    }
    std::lock_guard connecting(state->connect_mu);
    std::vector<std::shared_ptr<Lane>> old;
    uint64_t generation;
    {
      std::lock_guard lock(state->mu);
      if (state->connected) return state->lanes;  // another batch connected meanwhile
      old.swap(state->lanes);
      generation = state->generation;
    }
    for (auto& lane : old) retire_lane(lane);
    // Lane i: our device i towards the peer's device i mod (its device count). With N NICs on
    // both sides every NIC pair carries its own share of each batch.
    int remote_count = static_cast<int>(peer.desc.rdma_devices.size());
    HandshakeRequest request;
    request.requester = endpoint_;
    std::vector<std::shared_ptr<Lane>> lanes;
    try {
      for (size_t i = 0; i < devices_.size(); ++i) {
        int remote_dev = static_cast<int>(i) % remote_count;
        lanes.push_back(create_lane(*verbs_, devices_[i].get(), remote_dev));
        lanes.back()->owner = state;
        request.qps.push_back(endpoint_of(*lanes.back(), static_cast<int>(i), remote_dev));
      }
      // The network round trip runs with no lock but connect_mu held.
      std::string reply_blob =
          net::control_call(peer.desc.endpoint, config_.cluster_token, encode_request(request),
                            std::min(config_.timeout_s, 10.0));
      auto reply = decode_reply(reply_blob);
      if (reply.size() != lanes.size())
        throw TransferError("peer answered " + std::to_string(reply.size()) + " QPs for " +
                            std::to_string(lanes.size()));
      for (const auto& remote : reply) {
        if (remote.lane < 0 || remote.lane >= static_cast<int>(lanes.size()))
          throw TransferError("peer answered for lane " + std::to_string(remote.lane));
        connect_lane(*verbs_, *lanes[remote.lane], remote);
      }
    } catch (const std::exception& e) {
      for (auto& lane : lanes) destroy_lane(*verbs_, *lane);  // nothing was posted on them
      throw TransferError(std::string("RDMA handshake with ") + peer.desc.endpoint + " failed: " +
                          e.what());
    }
    std::lock_guard lock(state->mu);
    state->lanes = lanes;
    // A descriptor change during the handshake: this batch uses these lanes, the next
    // reconnects.
    state->connected = state->generation == generation;
    return lanes;
  }

  // --- posting ----------------------------------------------------------------------------

  uint32_t remote_rkey(const Peer& peer, uint64_t addr, uint64_t len, int remote_dev) {
    const auto& regions = peer.desc.regions;
    for (size_t i = 0; i < regions.size(); ++i) {
      auto [start, length] = regions[i];
      if (addr >= start && len <= length && addr - start <= length - len) {
        const auto& keys = peer.desc.rkeys.at(i);
        if (remote_dev >= static_cast<int>(keys.size()))
          throw TransferError("segment '" + peer.desc.name + "' has no rkey for device " +
                              std::to_string(remote_dev));
        return keys[remote_dev];
      }
    }
    throw TransferError("remote range " + hex_addr(addr) + " is outside segment '" +
                        peer.desc.name + "'");
  }

  void post_batch(const Peer& peer, const std::shared_ptr<PeerState>& state,
                  const std::vector<std::shared_ptr<Lane>>& lanes,
                  const std::shared_ptr<Batch>& batch, const std::vector<Request>& requests) {
    // Slice: every WR moves at most rdma_slice_bytes; stripe: slices go round-robin over the
    // lanes (NICs), so one large transfer uses every NIC at once.
    const int lane_count = static_cast<int>(lanes.size());
    std::vector<std::vector<Request>> per_lane(lane_count);
    int next = static_cast<int>(state->next_lane.fetch_add(1) % lane_count);
    for (Request r : requests) {
      while (r.length > 0) {
        uint64_t take = std::min<uint64_t>(r.length, config_.rdma_slice_bytes);
        per_lane[next].push_back({r.local, r.remote, take});
        next = (next + 1) % lane_count;
        r.local += take;
        r.remote += take;
        r.length -= take;
      }
    }
    const size_t per_chain = static_cast<size_t>(config_.rdma_signal_every);
    int chains = 0;
    for (const auto& slices : per_lane)
      chains += static_cast<int>((slices.size() + per_chain - 1) / per_chain);
    batch->set_parts(chains);
    for (int l = 0; l < lane_count; ++l) {
      const auto& lane = lanes[l];
      if (!per_lane[l].empty()) {
        std::weak_ptr<Lane> weak = lane;
        batch->add_abort_hook([this, weak] {
          if (auto dead = weak.lock()) {
            lane_to_error(*verbs_, *dead);
            mark_disconnected(dead);
          }
        });
      }
      const auto& slices = per_lane[l];
      for (size_t first = 0; first < slices.size(); first += per_chain) {
        size_t count = std::min(per_chain, slices.size() - first);
        post_chain(peer, lane, batch, &slices[first], count);
      }
    }
  }

  // Reserves room for `count` WRs in the device's completion budget, then in the lane's send
  // queue, waiting (never past the batch deadline) for earlier work to complete. Returns the
  // reason when there is none.
  std::string reserve(Lane& lane, const std::shared_ptr<Batch>& batch, uint32_t count) {
    Device& dev = *lane.device;
    {
      std::unique_lock lock(dev.budget_mu);
      bool room = dev.budget_cv.wait_until(lock, batch->deadline(), [&] {
        return dev.outstanding + count <= static_cast<uint32_t>(dev.cq_depth) ||
               batch->failed_early();
      });
      if (batch->failed_early()) return "batch already failed";
      if (!room) return "completion queue of " + dev.name + " stayed full";
      dev.outstanding += count;
    }
    std::unique_lock lock(lane.mu);
    bool room = lane.cv.wait_until(lock, batch->deadline(), [&] {
      return lane.outstanding + count <= kMaxSendWr || batch->failed_early();
    });
    if (!room || batch->failed_early() || !lane.qp) {
      lock.unlock();
      dev.release(count);
      return batch->failed_early() ? "batch already failed"
                                   : "send queue on " + dev.name + " stayed full";
    }
    lane.outstanding += count;
    ++lane.chains_in_flight;
    return {};
  }

  void post_chain(const Peer& peer, const std::shared_ptr<Lane>& lane,
                  const std::shared_ptr<Batch>& batch, const Request* slices, size_t count) {
    auto chain = std::make_unique<Chain>();
    chain->batch = batch;
    chain->lane = lane;
    chain->wrs = static_cast<uint32_t>(count);
    if (batch->failed_early()) {
      chain->report(false, "batch already failed");
      return;
    }
    std::vector<ibv_sge> sges(count);
    std::vector<ibv_send_wr> wrs(count);
    const int dev = lane->device->index;
    try {
      for (size_t i = 0; i < count; ++i) {
        const Request& s = slices[i];
        const Region* region = chain->leases.find(s.local, s.length);
        if (!region) {
          Lease lease = registry_.acquire(s.local, s.length);
          if (!lease)
            throw TransferError("local range " + hex_addr(s.local) + "+" +
                                std::to_string(s.length) +
                                " is outside the registered regions (unregistered while the "
                                "transfer was queued?)");
          region = lease.region();
          chain->leases.add(std::move(lease));
        }
        sges[i] = ibv_sge{s.local, static_cast<uint32_t>(s.length), region->lkeys.at(dev)};
        ibv_send_wr& wr = wrs[i];
        wr = ibv_send_wr{};
        wr.wr_id = reinterpret_cast<uint64_t>(chain.get()) | (i + 1 == count ? 1 : 0);
        wr.sg_list = &sges[i];
        wr.num_sge = 1;
        wr.opcode = batch->op() == OpCode::kWrite ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
        wr.send_flags = i + 1 == count ? IBV_SEND_SIGNALED : 0;
        wr.wr.rdma.remote_addr = s.remote;
        wr.wr.rdma.rkey = remote_rkey(peer, s.remote, s.length, lane->remote_device);
        wr.next = i + 1 < count ? &wrs[i + 1] : nullptr;
      }
    } catch (const std::exception& e) {
      chain->report(false, e.what());
      return;
    }
    std::string no_room = reserve(*lane, batch, chain->wrs);
    if (!no_room.empty()) {
      chain->report(false, no_room);
      return;
    }
    ibv_send_wr* bad = nullptr;
    Chain* raw = chain.release();  // owned by the completion poller from here on
    int rc;
    {
      std::lock_guard lock(lane->mu);  // the QP stays alive while we post on it
      rc = lane->qp ? verbs_->post_send(lane->qp, wrs.data(), &bad) : EINVAL;
    }
    if (rc == 0) return;
    // ibv_post_send stopped at *bad: the WRs before it are posted (they name the chain and
    // read its memory), the rest are not. Nothing posted: the chain is ours again.
    size_t posted = 0;
    if (bad >= wrs.data() && bad < wrs.data() + count) posted = static_cast<size_t>(bad - wrs.data());
    std::unique_ptr<Chain> back(raw);
    std::string error = sys_error(std::string("ibv_post_send on ") + lane->device->name, rc);
    if (posted > 0)
      error += " (posted " + std::to_string(posted) + " of " + std::to_string(count) +
               " work requests)";
    back->report(false, error);
    MV_LOG(kWarn, "RDMA " << op_name(batch->op()) << " to " << batch->peer() << ": " << error);
    {
      std::lock_guard lock(lane->mu);
      lane->outstanding -= static_cast<uint32_t>(count - posted);
      --lane->chains_in_flight;
      if (posted > 0) lane->orphans.push_back(std::move(back));
      lane->cv.notify_all();
    }
    lane->device->release(static_cast<uint32_t>(count - posted));
    // The posted prefix has no signalled WR, so nothing would ever say it finished: the QP goes
    // to ERR, which flushes it; the chain and the WRs' send-queue and completion budget are
    // released when the QP is destroyed. The next batch reconnects.
    if (posted > 0) lane_to_error(*verbs_, *lane);
    mark_disconnected(lane);
  }

  // --- completions ------------------------------------------------------------------------

  void poll_loop() {
    ibv_wc wcs[64];
    int idle = 0;
    while (!stop_poller_.load()) {
      // Nothing may escape this thread (std::terminate would end the whole process): a failure
      // is logged and the loop goes on.
      try {
        int found = 0;
        for (auto& dev : devices_) {
          int n = verbs_->poll_cq(dev->cq, 64, wcs);
          for (int i = 0; i < n; ++i) on_completion(*dev, wcs[i]);
          found += std::max(n, 0);
        }
        if (found) {
          idle = 0;
        } else {
          // Spin briefly for latency, then back off so an idle engine costs no CPU.
          ++idle;
          if (idle > 200)
            std::this_thread::sleep_for(std::chrono::microseconds(idle > 2000 ? 1000 : 50));
          reap_retired();
        }
      } catch (const std::exception& e) {
        MV_LOG(kError, "RDMA completion thread: " << e.what());
      } catch (...) {
        MV_LOG(kError, "RDMA completion thread: unknown exception");
      }
    }
  }

  void on_completion(const Device& dev, const ibv_wc& wc) {
    auto* chain = reinterpret_cast<Chain*>(wc.wr_id & ~uint64_t(1));
    bool tail = wc.wr_id & 1;
    if (!chain) return;
    if (wc.status != IBV_WC_SUCCESS) {
      char vendor[16];
      std::snprintf(vendor, sizeof(vendor), "0x%x", wc.vendor_err);
      chain->report(false, std::string("RDMA ") + op_name(chain->batch->op()) + " to " +
                               chain->batch->peer() + " via " + dev.name + " failed: " +
                               ibv_wc_status_str(wc.status) + " (wc status " +
                               std::to_string(int(wc.status)) + ", vendor_err " + vendor + ")");
      mark_disconnected(chain->lane);
    }
    if (!tail) return;
    if (wc.status == IBV_WC_SUCCESS) chain->report(true, "");
    {
      std::lock_guard lock(chain->lane->mu);
      chain->lane->outstanding -= chain->wrs;
      --chain->lane->chains_in_flight;
      chain->lane->cv.notify_all();
    }
    chain->lane->device->release(chain->wrs);
    delete chain;
  }

  void mark_disconnected(const std::shared_ptr<Lane>& lane) {
    auto state = lane->owner.lock();
    if (!state) return;
    std::lock_guard lock(state->mu);
    for (auto& l : state->lanes)
      if (l == lane) state->connected = false;
  }

  void reap_retired() {
    std::vector<std::shared_ptr<Lane>> done;
    {
      std::lock_guard lock(retired_mu_);
      for (auto it = retired_.begin(); it != retired_.end();) {
        bool idle;
        {
          std::lock_guard lane_lock((*it)->mu);
          idle = (*it)->chains_in_flight == 0;
        }
        if (idle) {
          done.push_back(*it);
          it = retired_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& lane : done) destroy_lane(*verbs_, *lane);
  }

  RegionRegistry& registry_;
  EngineConfig config_;
  std::unique_ptr<Verbs> verbs_;
  net::Listener server_;
  std::vector<std::unique_ptr<Device>> devices_;
  std::string endpoint_;
  std::mutex mu_;
  bool stopped_ = false;
  std::map<uint64_t, std::shared_ptr<PeerState>> peers_;
  std::map<std::string, std::shared_ptr<Lane>> passive_;
  std::mutex retired_mu_;
  std::vector<std::shared_ptr<Lane>> retired_;
  std::thread poller_;
  std::atomic<bool> stop_poller_{false};
};

}  // namespace

bool rdma_usable(const EngineConfig& config, std::string* why) {
  auto verbs = make_verbs(config);
  auto names = verbs->device_names();
  if (names.empty()) {
    *why = "no RDMA device found (" + verbs->kind() + " lists none)";
    return false;
  }
  if (select_devices(*verbs, config).empty()) {
    *why = "none of the requested RDMA devices exists";
    return false;
  }
  return true;
}

std::unique_ptr<Transport> make_rdma_transport(RegionRegistry& registry, const EngineConfig& config) {
  return std::make_unique<RdmaTransport>(registry, config);
}

}  // namespace mooncake_vllm::rdma

// Registered memory regions with bounds checks and leases.
//
// Every byte the engine touches, local or on behalf of a peer, lies inside a registered region,
// and is touched only while a Lease on that region is held. unregister() removes the region at
// once (so new transfers into it fail cleanly) and then waits for the leases still held to be
// returned, so that once it returns nothing reads or writes that memory any more.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

namespace mooncake_vllm {

struct Region {
  uint64_t addr;
  uint64_t length;
  std::vector<uint32_t> lkeys;  // RDMA: per device; empty for TCP
  std::vector<uint32_t> rkeys;
  std::vector<void*> mrs;       // RDMA: per device memory region handles
  // Peers may READ this region only when it was registered with remote_read; by default a
  // region is a write target only (the connector only ever WRITEs from P into D).
  bool remote_read = false;
  bool contains(uint64_t a, uint64_t len) const {
    return a >= addr && len <= length && a - addr <= length - len;
  }
};

class RegionRegistry;

// Keeps one region alive (not unregistered) while held. Movable, not copyable.
class Lease {
 public:
  Lease() = default;
  Lease(RegionRegistry* owner, std::shared_ptr<const Region> region);
  Lease(Lease&& other) noexcept;
  Lease& operator=(Lease&& other) noexcept;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease();
  const Region* region() const { return region_.get(); }
  explicit operator bool() const { return region_ != nullptr; }

 private:
  void reset();
  RegionRegistry* owner_ = nullptr;
  std::shared_ptr<const Region> region_;
};

// Leases for all regions that a set of ranges touches, deduplicated (a layer's blocks usually
// live in one or two regions).
class LeaseSet {
 public:
  bool holds(uint64_t addr, uint64_t len) const;
  void add(Lease lease) { leases_.push_back(std::move(lease)); }
  const Region* find(uint64_t addr, uint64_t len) const;
  // Empty when every held region allows remote READ, else the error naming the first that
  // does not.
  std::string check_remote_read() const;
  void clear() { leases_.clear(); }

 private:
  std::vector<Lease> leases_;
};

class RegionRegistry {
 public:
  // Throws InvalidArgument on a zero length or an overlap with a registered region.
  void add(std::shared_ptr<Region> region);
  // Removes the region at `addr`, then waits (up to `drain_timeout_s`) for its leases to be
  // returned. Returns the removed region (for the transport to release MRs), or nullopt when
  // no region starts at addr. Throws TransferError if leases are still held at the deadline.
  std::shared_ptr<const Region> remove(uint64_t addr, double drain_timeout_s);
  // A lease on the region containing [addr, addr+len), or an empty Lease if there is none.
  Lease acquire(uint64_t addr, uint64_t len);
  // Fills `set` with leases covering every range; returns an error text naming the first range
  // outside the registered regions (empty on success).
  std::string acquire_all(const uint64_t* addrs, const uint64_t* lens, size_t n, LeaseSet& set,
                          const char* side);
  std::vector<std::shared_ptr<const Region>> snapshot() const;

 private:
  friend class Lease;
  void release(const Region* region);

  mutable std::shared_mutex mu_;
  std::map<uint64_t, std::shared_ptr<const Region>> by_addr_;
  std::mutex lease_mu_;
  std::condition_variable lease_cv_;
  std::map<const Region*, int> lease_counts_;
};

std::string hex_addr(uint64_t addr);

}  // namespace mooncake_vllm

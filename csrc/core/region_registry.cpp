#include "mooncake_vllm/region_registry.h"

#include <chrono>
#include <sstream>

#include "mooncake_vllm/types.h"

namespace mooncake_vllm {

std::string hex_addr(uint64_t addr) {
  std::ostringstream out;
  out << "0x" << std::hex << addr;
  return out.str();
}

Lease::Lease(RegionRegistry* owner, std::shared_ptr<const Region> region)
    : owner_(owner), region_(std::move(region)) {}

Lease::Lease(Lease&& other) noexcept : owner_(other.owner_), region_(std::move(other.region_)) {
  other.owner_ = nullptr;
}

Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    reset();
    owner_ = other.owner_;
    region_ = std::move(other.region_);
    other.owner_ = nullptr;
  }
  return *this;
}

Lease::~Lease() { reset(); }

void Lease::reset() {
  if (owner_ && region_) owner_->release(region_.get());
  owner_ = nullptr;
  region_.reset();
}

bool LeaseSet::holds(uint64_t addr, uint64_t len) const { return find(addr, len) != nullptr; }

const Region* LeaseSet::find(uint64_t addr, uint64_t len) const {
  for (const auto& lease : leases_)
    if (lease.region()->contains(addr, len)) return lease.region();
  return nullptr;
}

std::string LeaseSet::check_remote_read() const {
  for (const auto& lease : leases_)
    if (!lease.region()->remote_read)
      return "region " + hex_addr(lease.region()->addr) + "+" +
             std::to_string(lease.region()->length) +
             " is not registered for remote read (register it with remote_read=True)";
  return {};
}

void RegionRegistry::add(std::shared_ptr<Region> region) {
  if (region->length == 0) throw InvalidArgument("register: length must be > 0");
  if (region->addr == 0) throw InvalidArgument("register: address must not be 0");
  std::unique_lock lock(mu_);
  auto next = by_addr_.lower_bound(region->addr);
  if (next != by_addr_.end() && next->second->addr < region->addr + region->length)
    throw InvalidArgument("register: region " + hex_addr(region->addr) + "+" +
                          std::to_string(region->length) + " overlaps registered region " +
                          hex_addr(next->second->addr));
  if (next != by_addr_.begin()) {
    auto prev = std::prev(next);
    if (prev->second->addr + prev->second->length > region->addr)
      throw InvalidArgument("register: region " + hex_addr(region->addr) +
                            " overlaps registered region " + hex_addr(prev->second->addr));
  }
  by_addr_.emplace(region->addr, std::move(region));
}

std::shared_ptr<const Region> RegionRegistry::remove(uint64_t addr, double drain_timeout_s) {
  std::shared_ptr<const Region> region;
  {
    std::unique_lock lock(mu_);
    auto it = by_addr_.find(addr);
    if (it == by_addr_.end()) return nullptr;
    region = it->second;
    by_addr_.erase(it);
  }
  std::unique_lock lock(lease_mu_);
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(drain_timeout_s));
  bool drained = lease_cv_.wait_until(lock, deadline, [&] {
    auto found = lease_counts_.find(region.get());
    return found == lease_counts_.end() || found->second == 0;
  });
  if (!drained)
    throw TransferError("unregister " + hex_addr(addr) + ": transfers still use the region after " +
                        std::to_string(drain_timeout_s) + " s");
  lease_counts_.erase(region.get());
  return region;
}

Lease RegionRegistry::acquire(uint64_t addr, uint64_t len) {
  std::shared_lock lock(mu_);
  auto it = by_addr_.upper_bound(addr);
  if (it == by_addr_.begin()) return {};
  --it;
  if (!it->second->contains(addr, len)) return {};
  {
    std::lock_guard guard(lease_mu_);
    ++lease_counts_[it->second.get()];
  }
  return Lease(this, it->second);
}

std::string RegionRegistry::acquire_all(const uint64_t* addrs, const uint64_t* lens, size_t n,
                                        LeaseSet& set, const char* side) {
  for (size_t i = 0; i < n; ++i) {
    if (lens[i] == 0 || set.holds(addrs[i], lens[i])) continue;
    Lease lease = acquire(addrs[i], lens[i]);
    if (!lease)
      return std::string(side) + " range " + hex_addr(addrs[i]) + "+" + std::to_string(lens[i]) +
             " is outside the registered regions";
    set.add(std::move(lease));
  }
  return {};
}

std::vector<std::shared_ptr<const Region>> RegionRegistry::snapshot() const {
  std::shared_lock lock(mu_);
  std::vector<std::shared_ptr<const Region>> out;
  for (const auto& [addr, region] : by_addr_) out.push_back(region);
  return out;
}

void RegionRegistry::release(const Region* region) {
  std::lock_guard guard(lease_mu_);
  auto it = lease_counts_.find(region);
  if (it != lease_counts_.end() && --it->second == 0) lease_cv_.notify_all();
}

}  // namespace mooncake_vllm

#include "mooncake_vllm/batch.h"

#include <sstream>
#include <thread>

#include "mooncake_vllm/log.h"

namespace mooncake_vllm {

void Batch::set_parts(int parts) {
  std::lock_guard lock(mu_);
  remaining_ = parts;
  parts_set_ = true;
  if (parts == 0 && state_ == BatchState::kPending) {
    state_ = BatchState::kDone;
    cv_.notify_all();
  }
}

void Batch::part_done(bool ok, const std::string& error) {
  std::lock_guard lock(mu_);
  if (!ok && error_.empty()) {
    error_ = error;
    failed_flag_.store(true, std::memory_order_release);
  }
  if (--remaining_ == 0 && parts_set_ && state_ == BatchState::kPending) {
    state_ = error_.empty() ? BatchState::kDone : BatchState::kFailed;
    cv_.notify_all();
  }
}

void Batch::record_error(const std::string& error) {
  std::lock_guard lock(mu_);
  if (state_ != BatchState::kPending) return;
  if (error_.empty()) error_ = error;
  failed_flag_.store(true, std::memory_order_release);
}

void Batch::fail_now(const std::string& error) {
  std::lock_guard lock(mu_);
  if (state_ != BatchState::kPending) return;
  if (error_.empty()) error_ = error;
  failed_flag_.store(true, std::memory_order_release);
  state_ = BatchState::kFailed;
  cv_.notify_all();
}

BatchState Batch::state(std::string* error) const {
  std::lock_guard lock(mu_);
  if (error) *error = error_;
  return state_;
}

BatchState Batch::wait_until(Clock::time_point until, std::string* error) const {
  std::unique_lock lock(mu_);
  cv_.wait_until(lock, until, [&] { return state_ != BatchState::kPending; });
  if (error) *error = error_;
  return state_;
}

void Batch::add_abort_hook(std::function<void()> hook) {
  std::lock_guard lock(mu_);
  abort_hooks_.push_back(std::move(hook));
}

void Batch::run_abort_hooks() {
  std::vector<std::function<void()>> hooks;
  {
    std::lock_guard lock(mu_);
    hooks.swap(abort_hooks_);
  }
  // A hook that throws must not keep the others from running (or end the watchdog thread).
  for (auto& hook : hooks) {
    try {
      hook();
    } catch (const std::exception& e) {
      MV_LOG(kError, "batch " << id_ << ": abort hook failed: " << e.what());
    } catch (...) {
      MV_LOG(kError, "batch " << id_ << ": abort hook failed");
    }
  }
}

BatchTable::BatchTable() : watchdog_([this] { watchdog_loop(); }) {}

BatchTable::~BatchTable() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  watchdog_.join();
}

std::shared_ptr<Batch> BatchTable::create(OpCode op, double timeout_s, const std::string& peer) {
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(timeout_s));
  std::lock_guard lock(mu_);
  auto batch = std::make_shared<Batch>(next_id_++, op, deadline, peer);
  batches_.emplace(batch->id(), batch);
  return batch;
}

std::shared_ptr<Batch> BatchTable::find(uint64_t id) const {
  std::lock_guard lock(mu_);
  auto it = batches_.find(id);
  if (it == batches_.end())
    throw InvalidArgument("unknown batch id " + std::to_string(id) + " (released or never submitted)");
  return it->second;
}

void BatchTable::release(uint64_t id) {
  std::lock_guard lock(mu_);
  batches_.erase(id);
}

size_t BatchTable::size() const {
  std::lock_guard lock(mu_);
  return batches_.size();
}

void BatchTable::expire(Batch& batch) {
  std::ostringstream error;
  error << op_name(batch.op()) << " batch " << batch.id() << " to " << batch.peer()
        << " timed out (peer unresponsive or gone)";
  MV_LOG(kWarn, error.str());
  // Cause first, then abort the batch's connections / queue pairs, then wake the waiters:
  // whoever sees FAILED can rely on the stuck transfer having been torn down.
  batch.record_error(error.str());
  batch.run_abort_hooks();
  batch.fail_now(error.str());
}

// Why a thread and not per-wait checks: a batch must fail by its deadline even when nobody is
// waiting on it, and its stuck connections must be shut down so the next batch can reconnect.
void BatchTable::watchdog_loop() {
  std::unique_lock lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::milliseconds(20));
    auto now = Clock::now();
    std::vector<std::shared_ptr<Batch>> expired;
    for (auto& [id, batch] : batches_)
      if (batch->deadline() <= now && batch->state(nullptr) == BatchState::kPending)
        expired.push_back(batch);
    lock.unlock();
    for (auto& batch : expired) {
      try {
        expire(*batch);
      } catch (...) {
        // Nothing may end this thread (std::terminate); the batch fails without the detail.
        try {
          batch->fail_now("batch timed out");
        } catch (...) {
        }
      }
    }
    expired.clear();
    lock.lock();
  }
}

}  // namespace mooncake_vllm

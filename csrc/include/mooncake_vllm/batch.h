// One submitted batch: how many parts (messages / WR chains) are outstanding, and its outcome.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mooncake_vllm/types.h"

namespace mooncake_vllm {

using Clock = std::chrono::steady_clock;

class Batch {
 public:
  Batch(uint64_t id, OpCode op, Clock::time_point deadline, std::string peer)
      : id_(id), op_(op), deadline_(deadline), peer_(std::move(peer)) {}

  uint64_t id() const { return id_; }
  OpCode op() const { return op_; }
  Clock::time_point deadline() const { return deadline_; }
  const std::string& peer() const { return peer_; }

  // Called once by the transport before any part can complete.
  void set_parts(int parts);
  // Each part reports once. The batch is DONE when every part succeeded, FAILED (with the first
  // error) once every part has reported and one failed.
  void part_done(bool ok, const std::string& error);
  // Records `error` as the batch's cause (if it has none yet) without waking waiters, so that
  // clean-up (abort hooks) can run before anyone sees the batch as failed.
  void record_error(const std::string& error);
  // Fails the batch now (deadline passed); parts that report later are ignored.
  void fail_now(const std::string& error);
  bool failed_early() const { return failed_flag_.load(std::memory_order_acquire); }

  BatchState state(std::string* error) const;
  // Waits until the batch leaves PENDING or `until`; returns the state.
  BatchState wait_until(Clock::time_point until, std::string* error) const;

  // Aborts to run if the deadline passes (the transport registers "shut down this connection").
  void add_abort_hook(std::function<void()> hook);
  void run_abort_hooks();

 private:
  const uint64_t id_;
  const OpCode op_;
  const Clock::time_point deadline_;
  const std::string peer_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  int remaining_ = 0;
  bool parts_set_ = false;
  BatchState state_ = BatchState::kPending;
  std::string error_;
  std::atomic<bool> failed_flag_{false};
  std::vector<std::function<void()>> abort_hooks_;
};

// Live batches by id, plus the deadline watchdog.
class BatchTable {
 public:
  BatchTable();
  ~BatchTable();
  std::shared_ptr<Batch> create(OpCode op, double timeout_s, const std::string& peer);
  std::shared_ptr<Batch> find(uint64_t id) const;  // throws InvalidArgument if unknown
  void release(uint64_t id);
  size_t size() const;

 private:
  void watchdog_loop();
  static void expire(Batch& batch);
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t next_id_ = 1;
  std::map<uint64_t, std::shared_ptr<Batch>> batches_;
  std::thread watchdog_;
};

}  // namespace mooncake_vllm

// One TCP connection slot to a peer: a sender thread streams queued messages back to back, a
// receiver thread matches responses (in order) to them, so requests are pipelined and acked
// per message, never per block.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mooncake_vllm/batch.h"
#include "mooncake_vllm/region_registry.h"
#include "transports/common/socket_io.h"
#include "transports/common/wire.h"

namespace mooncake_vllm::tcp {

// One request message: a part of a batch for one connection.
struct Message {
  OpCode op;
  std::vector<Request> requests;
  uint64_t bytes = 0;
  std::shared_ptr<Batch> batch;
  LeaseSet leases;  // local regions, held while their memory is read (WRITE) or written (READ)
  uint64_t seq = 0;  // on its connection; the response must carry the same
  std::atomic<bool> completed{false};
  void complete(bool ok, const std::string& error) {
    if (completed.exchange(true)) return;
    leases.clear();
    batch->part_done(ok, error);
  }
};

struct LinkSettings {
  std::string endpoint;
  std::string token;
  double timeout_s;
  // A connection with nothing in flight for this long is closed by us, well before the peer's
  // listener would close it as idle (a close racing a new request would fail that request).
  double idle_close_s;
};

// Shared by the links of one transport.
struct LinkCounters {
  std::atomic<uint64_t> messages_sent{0};
  std::atomic<uint64_t> send_calls{0};  // one sendmsg sequence per coalesced group
  std::atomic<uint64_t> bytes_sent{0};
  std::atomic<uint64_t> connects{0};
};

class Link : public std::enable_shared_from_this<Link> {
 public:
  Link(RegionRegistry& registry, LinkSettings settings, int index, LinkCounters& counters);
  ~Link();
  void start();
  void enqueue(std::shared_ptr<Message> msg);
  // Shuts the current connection down: its in-flight messages fail with `reason`; queued ones
  // go out on a fresh connection.
  void abort(const std::string& reason);
  void stop();
  void set_endpoint(const std::string& endpoint);
  // True when the link has no connection, nothing queued or being sent, and nothing happened
  // on it for `quiet` (the transport then evicts it; threads and all).
  bool idle_for(Clock::duration quiet);

 private:
  struct Conn {
    net::Socket sock;
    bool broken = false;
    uint64_t next_seq = 1;
    std::deque<std::shared_ptr<Message>> inflight;
    Clock::time_point last_used = Clock::now();
    bool receiving = false;  // a READ's payload is being read (its message already popped)
  };
  void sender_loop();
  // Closes the connection when it has been idle for idle_close_s; true when it did.
  bool close_if_idle();
  void send_next();
  void receiver_loop();
  std::shared_ptr<Conn> ensure_connected(const std::shared_ptr<Message>& msg);
  void fail_conn(const std::shared_ptr<Conn>& conn, const std::string& reason);
  struct Outgoing {
    std::shared_ptr<Message> msg;
    net::RequestHeader header;
    std::vector<net::Entry> entries;
  };
  bool prepare(const std::shared_ptr<Message>& msg, Outgoing& out);
  void send_group(const std::shared_ptr<Conn>& conn, std::vector<Outgoing>& group);
  void receive_response(const std::shared_ptr<Conn>& conn, const std::shared_ptr<Message>& msg);

  RegionRegistry& registry_;
  LinkSettings settings_;
  const int index_;
  LinkCounters& counters_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Message>> queue_;
  std::shared_ptr<Conn> conn_;
  bool stop_ = false;
  bool busy_ = false;  // send_next holds messages taken off the queue
  Clock::time_point last_activity_ = Clock::now();
  std::thread sender_;
  std::thread receiver_;
};

}  // namespace mooncake_vllm::tcp

#include "tcp_link.h"

#include <poll.h>

#include <optional>

#include "mooncake_vllm/log.h"
#include "transports/common/auth.h"
#include "transports/common/frames.h"
#include "transports/common/threads.h"

namespace mooncake_vllm::tcp {

using namespace net;

namespace {
bool peer_hung_up(int fd) {
  pollfd pfd{fd, POLLIN | POLLRDHUP, 0};
  return ::poll(&pfd, 1, 0) > 0;
}
}  // namespace

Link::Link(RegionRegistry& registry, LinkSettings settings, int index, LinkCounters& counters)
    : registry_(registry), settings_(std::move(settings)), index_(index), counters_(counters) {}

Link::~Link() { stop(); }

void Link::start() {
  const std::string what = "connection " + std::to_string(index_) + " to " + settings_.endpoint;
  try {
    sender_ = start_thread(what, [this] { sender_loop(); });
    receiver_ = start_thread(what, [this] { receiver_loop(); });
  } catch (...) {
    stop();
    throw;
  }
}

void Link::set_endpoint(const std::string& endpoint) {
  std::shared_ptr<Conn> old;
  {
    std::lock_guard lock(mu_);
    if (settings_.endpoint == endpoint) return;
    settings_.endpoint = endpoint;
    old = conn_;
  }
  if (old) fail_conn(old, "peer moved to " + endpoint);
}

bool Link::idle_for(Clock::duration quiet) {
  std::lock_guard lock(mu_);
  return !conn_ && queue_.empty() && !busy_ && Clock::now() - last_activity_ >= quiet;
}

void Link::enqueue(std::shared_ptr<Message> msg) {
  {
    std::lock_guard lock(mu_);
    if (!stop_) {
      last_activity_ = Clock::now();
      queue_.push_back(std::move(msg));
      cv_.notify_all();
      return;
    }
  }
  msg->complete(false, "engine closed");
}

void Link::abort(const std::string& reason) {
  std::shared_ptr<Conn> conn;
  {
    std::lock_guard lock(mu_);
    conn = conn_;
  }
  if (conn) fail_conn(conn, reason);
}

void Link::stop() {
  std::shared_ptr<Conn> conn;
  std::deque<std::shared_ptr<Message>> queued;
  {
    std::lock_guard lock(mu_);
    if (stop_ && !sender_.joinable()) return;
    stop_ = true;
    conn = conn_;
    queued.swap(queue_);
    cv_.notify_all();
  }
  if (conn) fail_conn(conn, "engine closed");
  for (auto& msg : queued) msg->complete(false, "engine closed");
  if (sender_.joinable()) sender_.join();
  if (receiver_.joinable()) receiver_.join();
}

void Link::fail_conn(const std::shared_ptr<Conn>& conn, const std::string& reason) {
  std::deque<std::shared_ptr<Message>> lost;
  {
    std::lock_guard lock(mu_);
    if (!conn->broken) {
      conn->broken = true;
      conn->sock.shutdown_both();
      MV_LOG(kDebug, "connection " << index_ << " to " << settings_.endpoint << " dropped: " << reason);
    }
    lost.swap(conn->inflight);
    if (conn_ == conn) conn_.reset();
    last_activity_ = Clock::now();
    cv_.notify_all();
  }
  for (auto& msg : lost) msg->complete(false, reason);
}

std::shared_ptr<Link::Conn> Link::ensure_connected(const std::shared_ptr<Message>& msg) {
  std::string endpoint;
  std::shared_ptr<Conn> stale;
  {
    std::lock_guard lock(mu_);
    if (conn_ && !conn_->broken) {
      // An idle connection whose peer went away (restart, crash) shows up as readable: the
      // server never speaks first. Drop it and reconnect instead of failing the next batch.
      if (!conn_->inflight.empty() || !peer_hung_up(conn_->sock.fd())) return conn_;
      stale = conn_;
    }
    endpoint = settings_.endpoint;
  }
  if (stale) fail_conn(stale, "peer closed the idle connection");
  auto conn = std::make_shared<Conn>();
  auto deadline = msg->batch->deadline();
  double left = std::chrono::duration<double>(deadline - Clock::now()).count();
  conn->sock = connect_to(endpoint, deadline, settings_.timeout_s);
  client_handshake(conn->sock.fd(), endpoint, settings_.token, std::max(left, 0.001));
  counters_.connects.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  if (stop_) throw TransferError("engine closed");
  conn_ = conn;
  cv_.notify_all();
  return conn;
}

namespace {
// Queued messages at most this big are sent together, several per system call: many small
// batches to the same peer (a layer's worth of blocks from several requests) then cost one
// sendmsg instead of one each. Each keeps its own header and response.
constexpr uint64_t kCoalesceMessageBytes = 256 * 1024;
constexpr uint64_t kCoalesceGroupBytes = 1024 * 1024;
constexpr size_t kCoalesceGroupMessages = 64;
}  // namespace

bool Link::close_if_idle() {
  std::shared_ptr<Conn> idle;
  {
    std::lock_guard lock(mu_);
    if (!conn_ || !conn_->inflight.empty() || conn_->receiving || !queue_.empty()) return false;
    if (Clock::now() - conn_->last_used <
        std::chrono::duration<double>(settings_.idle_close_s))
      return false;
    idle = conn_;
  }
  fail_conn(idle, "idle for " + std::to_string(settings_.idle_close_s) + " s");
  return true;
}

void Link::sender_loop() {
  const auto idle_check = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(std::min(1.0, settings_.idle_close_s / 2)));
  for (;;) {
    {
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, idle_check, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
    }
    // An exception here would end the thread (and std::terminate the process): it fails the
    // connection and its messages instead, and the loop goes on.
    try {
      if (!close_if_idle()) send_next();
    } catch (const std::exception& e) {
      MV_LOG(kError, "connection " << index_ << " to " << settings_.endpoint << ": " << e.what());
      abort(std::string("sender failed: ") + e.what());
    } catch (...) {
      MV_LOG(kError, "connection " << index_ << " to " << settings_.endpoint << ": unknown exception");
      abort("sender failed: unknown exception");
    }
  }
}

void Link::send_next() {
  std::vector<std::shared_ptr<Message>> group;
  struct Busy {  // marks the link busy while it holds messages off the queue
    explicit Busy(Link& l) : link(l) {}
    Busy(const Busy&) = delete;
    Busy& operator=(const Busy&) = delete;
    Link& link;
    ~Busy() {
      std::lock_guard lock(link.mu_);
      link.busy_ = false;
      link.last_activity_ = Clock::now();
    }
  };
  std::optional<Busy> busy;
  {
    std::unique_lock lock(mu_);
    if (stop_ || queue_.empty()) return;
    busy_ = true;
    busy.emplace(*this);  // its destructor takes mu_: constructed in place, never copied
    uint64_t bytes = 0;
    do {
      bytes += queue_.front()->bytes;
      group.push_back(std::move(queue_.front()));
      queue_.pop_front();
    } while (!queue_.empty() && group.back()->bytes <= kCoalesceMessageBytes &&
             queue_.front()->bytes <= kCoalesceMessageBytes &&
             bytes + queue_.front()->bytes <= kCoalesceGroupBytes &&
             group.size() < kCoalesceGroupMessages);
  }
  std::vector<Outgoing> ready;
  ready.reserve(group.size());
  try {
    for (auto& msg : group) {
      if (msg->batch->failed_early()) {
        msg->complete(false, "batch already failed");
        continue;
      }
      Outgoing out;
      if (prepare(msg, out)) ready.push_back(std::move(out));
    }
    if (ready.empty()) return;
    std::shared_ptr<Conn> conn = ensure_connected(ready.front().msg);
    send_group(conn, ready);
  } catch (const TransferError& e) {
    // Could not connect or authenticate: these messages fail with the cause; nothing was sent.
    for (auto& msg : group) msg->complete(false, e.what());
  } catch (...) {
    // Anything else is a bug or resource exhaustion: fail this group, and (sender_loop) the
    // connection with whatever it has in flight.
    for (auto& msg : group) msg->complete(false, "internal error while sending");
    throw;
  }
}

bool Link::prepare(const std::shared_ptr<Message>& msg, Outgoing& out) {
  // Local memory is checked (and pinned against unregister) at send time, not submit time: a
  // region unregistered while the message waited in the queue fails this message cleanly.
  std::vector<uint64_t> addrs, lens;
  addrs.reserve(msg->requests.size());
  lens.reserve(msg->requests.size());
  for (const Request& r : msg->requests) {
    addrs.push_back(r.local);
    lens.push_back(r.length);
  }
  std::string err = registry_.acquire_all(addrs.data(), lens.data(), addrs.size(), msg->leases,
                                          "local");
  if (!err.empty()) {
    msg->complete(false, err + " (unregistered while the transfer was queued?)");
    return false;
  }
  out.msg = msg;
  out.header = RequestHeader{};
  out.header.magic = kMagic;
  out.header.op = static_cast<uint8_t>(msg->op == OpCode::kWrite ? WireOp::kWrite : WireOp::kRead);
  out.header.count = static_cast<uint32_t>(msg->requests.size());
  out.header.total_bytes = msg->bytes;
  out.entries.reserve(msg->requests.size());
  for (const Request& r : msg->requests) out.entries.push_back({r.remote, r.length});
  return true;
}

void Link::send_group(const std::shared_ptr<Conn>& conn, std::vector<Outgoing>& group) {
  {
    // In flight before the first byte leaves, so the receiver can match the responses.
    std::unique_lock lock(mu_);
    if (conn->broken) {
      lock.unlock();
      for (auto& out : group) out.msg->complete(false, "connection to " + settings_.endpoint + " lost");
      return;
    }
    for (auto& out : group) {
      out.header.seq = conn->next_seq++;
      out.msg->seq = out.header.seq;
      conn->inflight.push_back(out.msg);
    }
    cv_.notify_all();
  }
  std::vector<iovec> iov;
  uint64_t bytes = 0;
  for (auto& out : group) {
    bytes += out.msg->op == OpCode::kWrite ? out.msg->bytes : 0;
    iov.push_back({&out.header, sizeof(out.header)});
    iov.push_back({out.entries.data(), out.entries.size() * sizeof(Entry)});
    if (out.msg->op == OpCode::kWrite)
      for (const Request& r : out.msg->requests)
        iov.push_back({reinterpret_cast<void*>(r.local), r.length});
  }
  std::string err = send_all(conn->sock.fd(), iov.data(), iov.size());
  if (!err.empty()) {
    fail_conn(conn, "sending to " + settings_.endpoint + ": " + err);
    return;
  }
  counters_.messages_sent.fetch_add(group.size(), std::memory_order_relaxed);
  counters_.send_calls.fetch_add(1, std::memory_order_relaxed);
  counters_.bytes_sent.fetch_add(bytes, std::memory_order_relaxed);
}

void Link::receiver_loop() {
  for (;;) {
    std::shared_ptr<Conn> conn;
    std::shared_ptr<Message> msg;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stop_ || (conn_ && !conn_->inflight.empty()); });
      if (stop_) return;
      conn = conn_;
      msg = conn->inflight.front();
    }
    try {
      receive_response(conn, msg);
    } catch (const std::exception& e) {
      MV_LOG(kError, "connection " << index_ << " to " << settings_.endpoint << ": " << e.what());
      fail_conn(conn, std::string("receiver failed: ") + e.what());
    } catch (...) {
      MV_LOG(kError, "connection " << index_ << " to " << settings_.endpoint << ": unknown exception");
      fail_conn(conn, "receiver failed: unknown exception");
    }
  }
}

// Everything the peer says is checked against what was asked before it is read: the error
// text's length (bounded), the sequence number, and the payload size (a READ's exact size,
// nothing for anything else). A peer that breaks the protocol loses the connection, and its
// messages fail naming why; the next batch reconnects.
void Link::receive_response(const std::shared_ptr<Conn>& conn,
                            const std::shared_ptr<Message>& msg) {
  const std::string& peer = settings_.endpoint;
  ResponseHeader resp{};
  std::string remote_error;
  std::string err = recv_response(conn->sock.fd(), resp, remote_error);
  bool protocol_error = false;
  if (err.empty() && resp.seq != msg->seq) {
    err = "response for request " + std::to_string(resp.seq) + ", expected " +
          std::to_string(msg->seq);
    protocol_error = true;
  }
  const uint64_t expected = resp.status == 0 && msg->op == OpCode::kRead ? msg->bytes : 0;
  if (err.empty() && resp.payload_bytes != expected) {
    err = "response carries " + std::to_string(resp.payload_bytes) + " payload bytes, expected " +
          std::to_string(expected);
    protocol_error = true;
  }
  if (!err.empty()) {
    if (protocol_error || err.rfind("malformed", 0) == 0)
      MV_LOG(kWarn, "dropping connection " << index_ << " to " << peer << ": " << err);
    fail_conn(conn, "connection to " + peer + ": " + err);
    return;
  }
  {
    std::lock_guard lock(mu_);
    if (conn->broken || conn->inflight.empty() || conn->inflight.front() != msg) return;
    conn->inflight.pop_front();
    conn->last_used = Clock::now();
    conn->receiving = expected > 0;
  }
  if (expected > 0) {
    std::vector<iovec> iov;
    iov.reserve(msg->requests.size());
    for (const Request& r : msg->requests)
      iov.push_back({reinterpret_cast<void*>(r.local), r.length});
    err = recv_all(conn->sock.fd(), iov.data(), iov.size());
    {
      std::lock_guard lock(mu_);
      conn->receiving = false;
      conn->last_used = Clock::now();
    }
    if (!err.empty()) {
      msg->complete(false, "connection to " + peer + " lost during READ: " + err);
      fail_conn(conn, "connection to " + peer + " lost: " + err);
      return;
    }
  }
  if (resp.status == 0)
    msg->complete(true, "");
  else
    msg->complete(false, "peer " + peer + " refused " + op_name(msg->op) + ": " + remote_error);
}

}  // namespace mooncake_vllm::tcp

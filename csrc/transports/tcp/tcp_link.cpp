#include "tcp_link.h"

#include <poll.h>

#include "auth.h"
#include "mooncake_vllm/log.h"
#include "wire.h"

namespace mooncake_vllm::tcp {

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
  sender_ = std::thread([this] { sender_loop(); });
  receiver_ = std::thread([this] { receiver_loop(); });
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

void Link::enqueue(std::shared_ptr<Message> msg) {
  {
    std::lock_guard lock(mu_);
    if (!stop_) {
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
  conn->sock = connect_to(endpoint, deadline);
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

void Link::sender_loop() {
  for (;;) {
    std::vector<std::shared_ptr<Message>> group;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
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
    for (auto& msg : group) {
      if (msg->batch->failed_early()) {
        msg->complete(false, "batch already failed");
        continue;
      }
      Outgoing out;
      if (prepare(msg, out)) ready.push_back(std::move(out));
    }
    if (ready.empty()) continue;
    std::shared_ptr<Conn> conn;
    try {
      conn = ensure_connected(ready.front().msg);
    } catch (const std::exception& e) {
      for (auto& out : ready) out.msg->complete(false, e.what());
      continue;
    }
    send_group(conn, ready);
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
    receive_response(conn, msg);
  }
}

void Link::receive_response(const std::shared_ptr<Conn>& conn,
                            const std::shared_ptr<Message>& msg) {
  const std::string& peer = settings_.endpoint;
  ResponseHeader resp{};
  std::string err = recv_bytes(conn->sock.fd(), &resp, sizeof(resp));
  if (err.empty() && resp.magic != kMagic) err = "malformed response";
  std::string remote_error(err.empty() ? resp.error_len : 0, '\0');
  if (err.empty() && !remote_error.empty())
    err = recv_bytes(conn->sock.fd(), remote_error.data(), remote_error.size());
  if (!err.empty()) {
    fail_conn(conn, "connection to " + peer + " lost: " + err);
    return;
  }
  {
    std::lock_guard lock(mu_);
    if (conn->broken || conn->inflight.empty() || conn->inflight.front() != msg) return;
    conn->inflight.pop_front();
  }
  if (resp.status == 0 && msg->op == OpCode::kRead) {
    if (resp.payload_bytes != msg->bytes) {
      fail_conn(conn, "peer " + peer + " answered a READ with the wrong size");
      msg->complete(false, "peer " + peer + " answered a READ with the wrong size");
      return;
    }
    std::vector<iovec> iov;
    iov.reserve(msg->requests.size());
    for (const Request& r : msg->requests) iov.push_back({reinterpret_cast<void*>(r.local), r.length});
    err = recv_all(conn->sock.fd(), iov.data(), iov.size());
    if (!err.empty()) {
      msg->complete(false, "connection to " + peer + " lost during READ: " + err);
      fail_conn(conn, "connection to " + peer + " lost: " + err);
      return;
    }
  } else if (resp.payload_bytes > 0) {
    err = discard_bytes(conn->sock.fd(), resp.payload_bytes);
    if (!err.empty()) fail_conn(conn, "connection to " + peer + " lost: " + err);
  }
  if (resp.status == 0)
    msg->complete(true, "");
  else
    msg->complete(false, "peer " + peer + " refused " + op_name(msg->op) + ": " + remote_error);
}

}  // namespace mooncake_vllm::tcp

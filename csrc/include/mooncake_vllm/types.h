// Plain data shared by the engine core, the transports and the binding.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mooncake_vllm {

enum class OpCode : uint8_t { kWrite = 1, kRead = 2 };

enum class BatchState : int { kPending = 0, kDone = 1, kFailed = 2 };

// One block to move: `length` bytes between our `local` address and the peer's `remote` one.
struct Request {
  uint64_t local;
  uint64_t remote;
  uint64_t length;
};

// Every error the engine reports carries its cause in what(); the binding maps it to
// mooncake_vllm.engine.TransferError.
class TransferError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A caller mistake (bad argument, unknown handle): the binding maps it to ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct EngineConfig {
  std::string hostname = "127.0.0.1";
  std::string protocol = "auto";  // tcp | rdma | auto
  uint16_t port = 0;
  std::string cluster_token;  // empty: no challenge
  double timeout_s = 30.0;
  int connections_per_peer = 4;
  std::vector<std::string> rdma_devices;  // empty: all
  std::string verbs = "ibverbs";          // "ibverbs" | "fake" (software test double)
  int fake_nics = 2;                      // devices the fake fabric shows this engine
  uint64_t rdma_slice_bytes = 1 << 20;    // RDMA transfers are cut into slices of this size
  int rdma_signal_every = 16;             // one signalled WR per this many in a chain
  int rdma_gid_index = -1;                // -1: chosen (RoCE v2 IPv4-mapped GID preferred)
  int rdma_port = 0;                      // 0: the first ACTIVE port of each device
  int rdma_cq_depth = 4096;               // completion queue entries (and WR budget) per device
  // The listener: connections served at once, in total and from one peer address, and how
  // long a connection may stay without sending a request before it is closed.
  int max_connections = 256;
  int max_connections_per_address = 64;
  double idle_timeout_s = 120.0;
};

struct RdmaDeviceInfo {
  std::string name;
  std::string gid;  // hex, 32 digits
  uint32_t lid = 0;
  uint32_t port = 1;
};

// What another engine needs to reach us; the binding turns it into a JSON-serialisable dict.
struct SegmentDescriptor {
  std::string name;
  std::string protocol;  // tcp | rdma
  std::string endpoint;  // host:port of the listener (RDMA uses it for the QP handshake)
  std::vector<std::pair<uint64_t, uint64_t>> regions;  // (addr, length)
  std::vector<RdmaDeviceInfo> rdma_devices;
  std::vector<std::vector<uint32_t>> rkeys;  // rkeys[region][device]
};

const char* op_name(OpCode op);

}  // namespace mooncake_vllm

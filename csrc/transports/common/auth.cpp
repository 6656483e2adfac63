#include "auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>
#include <vector>

#include "mooncake_vllm/types.h"
#include "wire.h"

namespace mooncake_vllm::net {

std::array<uint8_t, 32> hmac_sha256(const std::string& key, const uint8_t* data, size_t len) {
  std::array<uint8_t, 32> out{};
  unsigned int out_len = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), data, len, out.data(),
            &out_len) ||
      out_len != out.size())
    throw TransferError("HMAC-SHA256 failed in libcrypto");
  return out;
}

std::array<uint8_t, 32> handshake_mac(const std::string& token, const char* role,
                                      const uint8_t* server_nonce, const uint8_t* client_nonce) {
  std::string label = std::string("mooncake-vllm/2 ") + role;
  std::vector<uint8_t> data(label.begin(), label.end());
  data.push_back(0);
  data.insert(data.end(), server_nonce, server_nonce + kNonceBytes);
  data.insert(data.end(), client_nonce, client_nonce + kNonceBytes);
  return hmac_sha256(token, data.data(), data.size());
}

namespace {
bool same_mac(const std::array<uint8_t, 32>& expected, const uint8_t* got) {
  return CRYPTO_memcmp(expected.data(), got, expected.size()) == 0;
}
}  // namespace

std::string server_handshake(int fd, const std::string& token, double timeout_s) {
  Hello hello{};
  hello.magic = kMagic;
  hello.version = kVersion;
  hello.auth_required = token.empty() ? 0 : 1;
  if (RAND_bytes(hello.server_nonce, sizeof(hello.server_nonce)) != 1)
    return "no randomness for the nonce";
  set_recv_timeout(fd, timeout_s);
  std::string err = send_bytes(fd, &hello, sizeof(hello));
  Auth auth{};
  if (err.empty()) err = recv_bytes(fd, &auth, sizeof(auth));
  if (!err.empty()) return "handshake: " + err;
  if (auth.magic != kMagic) return "handshake: not a mooncake_vllm engine (bad magic)";
  if (auth.version != kVersion)
    return "handshake: wire version " + std::to_string(auth.version) + ", this engine speaks " +
           std::to_string(kVersion);
  Verdict verdict{};
  verdict.magic = kMagic;
  if (!token.empty()) {
    if (!auth.has_token ||
        !same_mac(handshake_mac(token, "client", hello.server_nonce, auth.client_nonce), auth.mac))
      verdict.status = 1;
    else
      std::memcpy(verdict.mac,
                  handshake_mac(token, "server", hello.server_nonce, auth.client_nonce).data(),
                  kMacBytes);
  }
  err = send_bytes(fd, &verdict, sizeof(verdict));
  if (verdict.status != 0) return auth.has_token ? "wrong cluster token" : "no cluster token";
  return err.empty() ? "" : "handshake: " + err;
}

void client_handshake(int fd, const std::string& endpoint, const std::string& token,
                      double timeout_s) {
  const std::string who = "handshake with " + endpoint + ": ";
  set_recv_timeout(fd, timeout_s);
  Hello hello{};
  std::string err = recv_bytes(fd, &hello, sizeof(hello));
  if (!err.empty()) throw TransferError(who + err);
  if (hello.magic != kMagic || hello.version != kVersion)
    throw TransferError(who + "not a compatible mooncake_vllm engine (magic/version mismatch)");
  if (hello.auth_required && token.empty())
    throw TransferError("peer " + endpoint + " requires a cluster token and none is configured");
  if (!hello.auth_required && !token.empty())
    throw TransferError("peer " + endpoint +
                        " does not require the cluster token; refusing to send data to an "
                        "unauthenticated peer");
  Auth auth{};
  auth.magic = kMagic;
  auth.version = kVersion;
  if (!token.empty()) {
    if (RAND_bytes(auth.client_nonce, sizeof(auth.client_nonce)) != 1)
      throw TransferError(who + "no randomness for the nonce");
    auth.has_token = 1;
    std::memcpy(auth.mac,
                handshake_mac(token, "client", hello.server_nonce, auth.client_nonce).data(),
                kMacBytes);
  }
  err = send_bytes(fd, &auth, sizeof(auth));
  Verdict verdict{};
  if (err.empty()) err = recv_bytes(fd, &verdict, sizeof(verdict));
  if (!err.empty()) throw TransferError(who + err);
  if (verdict.magic != kMagic) throw TransferError(who + "malformed verdict");
  if (verdict.status != 0)
    throw TransferError("peer " + endpoint + " refused the connection: wrong cluster token");
  if (!token.empty() &&
      !same_mac(handshake_mac(token, "server", hello.server_nonce, auth.client_nonce),
                verdict.mac))
    throw TransferError("peer " + endpoint +
                        " could not prove it knows the cluster token; refusing to send data");
  set_recv_timeout(fd, 0);
}

}  // namespace mooncake_vllm::net

// The floor under any HTTP server on this machine: one thread, epoll, and per request the
// least HTTP/1.1 asks for (read, find the end of the head and its Content-Length, wait for
// the body, write a fixed V2 answer). No routing, no JSON, no model. bench/http_floor.py
// builds it with the system's C++ compiler and measures what a request costs it; what is
// left of a request's CPU above this is the server's own work.
//
//     http_floor PORT
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <unordered_map>

namespace {

constexpr std::string_view kBody =
    R"({"model_name":"breast_cancer","model_version":"1","outputs":[)"
    R"({"name":"label","datatype":"INT64","shape":[1],"data":[1]},)"
    R"({"name":"probabilities","datatype":"FP32","shape":[1,2],"data":[0.004262507,0.9957375]}]})";

std::string Answer() {
  return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(kBody.size()) + "\r\n\r\n" + std::string(kBody);
}

// The bytes of the first complete request in `buffer`, or 0 while it is incomplete.
size_t CompleteRequest(std::string_view buffer) {
  size_t end = buffer.find("\r\n\r\n");
  if (end == std::string_view::npos) return 0;
  std::string_view head = buffer.substr(0, end);
  size_t length = 0;
  size_t at = head.find("Content-Length: ");
  if (at != std::string_view::npos) length = std::strtoul(head.data() + at + 16, nullptr, 10);
  size_t size = end + 4 + length;
  return buffer.size() >= size ? size : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: http_floor PORT\n");
    return 2;
  }
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  int on = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(std::atoi(argv[1])));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      listen(listener, 1024) != 0) {
    std::perror("http_floor: bind/listen");
    return 1;
  }
  int poller = epoll_create1(0);
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = listener;
  epoll_ctl(poller, EPOLL_CTL_ADD, listener, &event);

  const std::string answer = Answer();
  std::unordered_map<int, std::string> buffers;
  epoll_event ready[512];
  char chunk[65536];
  for (;;) {
    int count = epoll_wait(poller, ready, 512, -1);
    for (int i = 0; i < count; ++i) {
      int fd = ready[i].data.fd;
      if (fd == listener) {
        int client = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK);
        if (client < 0) continue;
        setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
        epoll_event watch{};
        watch.events = EPOLLIN;
        watch.data.fd = client;
        epoll_ctl(poller, EPOLL_CTL_ADD, client, &watch);
        continue;
      }
      ssize_t got = read(fd, chunk, sizeof chunk);
      if (got <= 0) {
        close(fd);
        buffers.erase(fd);
        continue;
      }
      std::string& buffer = buffers[fd];
      buffer.append(chunk, static_cast<size_t>(got));
      while (size_t size = CompleteRequest(buffer)) {
        buffer.erase(0, size);
        if (write(fd, answer.data(), answer.size()) < 0) break;
      }
    }
  }
}

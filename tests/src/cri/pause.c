/* The pod sandbox's process (Kubernetes' "pause"): it only holds the pod's
 * namespaces. Exits at once on SIGTERM or SIGINT (StopPodSandbox need not
 * wait for a SIGKILL), and reaps orphans, as it is PID 1 of the pod's PID
 * namespace when the pod shares one. Built `gcc -static` by mesh-testbed
 * (src/cri/image.rs): the image holds nothing else. */
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    int saved = errno;
    (void)sig;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
    errno = saved;
}

int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = quit;
    sigaction(SIGINT, &sa, 0);
    sigaction(SIGTERM, &sa, 0);
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &sa, 0);
    for (;;) {
        pause();
    }
}

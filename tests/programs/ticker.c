/* Prints who and where it is, a tick every 20 ms, then exits with 3. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 60;

	for (int i = 0; i < n; i++) {
		printf("tick %d pid %d uid %d euid %d gid %d egid %d\n", i, getpid(),
		       getuid(), geteuid(), getgid(), getegid());
		fflush(stdout);
		usleep(20000);
	}
	return 3;
}
